"""Read and write safetensors files as numpy arrays (bfloat16 included), with errors that name the file.

A thin layer over the `safetensors` package. It adds what a user needs when a file is bad: safetensors
reports a cut-off file only as "incomplete metadata" or "invalid header length", so on any failure to
open we compare the header's offsets with the file size and name the tensor that is cut off.
No code is ever executed from a weights file (that is the point of the format, unlike pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models.errors import UserError


class SafetensorsError(UserError, ValueError):
    """A safetensors file that is missing, truncated, corrupt, or cannot be written."""


def _open(path: Path):
    """safe_open for numpy, which validates the whole header against the file size up front.

    The pread backend copies each tensor straight into its array; the default mmap backend would also
    leave the file's pages resident, doubling peak memory on a multi-GB checkpoint.
    """
    try:
        return safe_open(os.fspath(path), framework="numpy", backend="pread")
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise _explain(path, e) from None


def _explain(path: Path, error: Exception) -> SafetensorsError:
    """The error for a file safetensors rejected: where it is cut off, if it is, else safetensors' reason."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or 8 + header_len > size:
            return SafetensorsError(f"{path}: file is {size} bytes, too short for even its header; the file is "
                                    f"truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
            ends = {name: 8 + header_len + int(entry["data_offsets"][1])
                    for name, entry in header.items() if name != "__metadata__"}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            ends = {}  # a malformed header: safetensors' own message says what is wrong with it
    cut = sorted((end, name) for name, end in ends.items() if end > size)
    if cut:
        end, name = cut[0]
        return SafetensorsError(
            f"{path}: tensor {name!r} ends at byte {end} but the file has only {size} bytes; the file is truncated "
            f"(an interrupted download or copy?)"
        )
    return SafetensorsError(f"{path}: not a valid safetensors file ({error})")


def contained_file(directory: str | os.PathLike, name: str, named_by: str | os.PathLike) -> Path:
    """`directory / name` when it stays inside `directory` (symlinks resolved); a shard file named by an index
    (`named_by`) must never reach files elsewhere ('../../etc/passwd', an absolute path)."""
    root = Path(directory).resolve()
    if not isinstance(name, str) or not name:
        raise SafetensorsError(f"{named_by} names the shard {name!r}; expected a file name inside {root}")
    path = (root / name).resolve()
    if path.parent != root and root not in path.parents:
        raise SafetensorsError(f"{named_by} names the shard {name!r}, which lies outside the model directory {root}; "
                               f"shard files must be inside it")
    return path


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """{tensor name: {"dtype": e.g. "BF16", "shape": [...]}} in file order, without reading any tensor."""
    with _open(Path(path)) as f:
        return {name: {"dtype": (s := f.get_slice(name)).get_dtype(), "shape": s.get_shape()}
                for name in f.offset_keys()}


def load(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as writable numpy arrays (all, or just `names`)."""
    path = Path(path)
    with _open(path) as f:
        names = f.offset_keys() if names is None else list(names)
        absent = sorted(set(names) - set(f.keys()))
        if absent:
            raise SafetensorsError(f"{path} has no tensor named {absent[0]!r} ({len(absent)} asked for are absent)")
        return {name: f.get_tensor(name) for name in names}


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to a safetensors file at `path`, with `metadata` as the header's free-form strings."""
    # save_file writes each array's raw buffer as is, so a strided view must be made C-contiguous first.
    contiguous = {name: np.require(array, requirements="C") for name, array in tensors.items()}
    try:
        save_file(contiguous, os.fspath(path), metadata=dict(metadata) if metadata else None)
    except SafetensorError as e:
        raise SafetensorsError(f"cannot write {path}: {e}") from None
