"""Read and write the safetensors format with numpy, bfloat16 included, and precise errors.

Layout of a file: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
little-endian tensor bytes, offsets counted from the end of the header. The `safetensors` package's
numpy API has no bfloat16, which exports need, and reports a truncated file only as a parse
failure; this reader checks every offset against the file size and names the tensor that is cut off.
No code is ever executed from a weights file (that is the point of the format, unlike pickle).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from models.errors import UserError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own cap: a bigger header means a corrupt file


class SafetensorsError(UserError, ValueError):
    """A safetensors file that is truncated, corrupt, or holds a dtype we cannot read."""


def read_header(path: Path) -> tuple[dict, int, int]:
    """(tensor entries, byte offset where data starts, file size), validated against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise SafetensorsError(
                    f"{path}: header claims {header_len} bytes but the file has {size}; the file is truncated "
                    f"or not safetensors"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
        except KeyError:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r} or a malformed entry; readable dtypes "
                f"are {sorted(_DTYPES)}"
            ) from None
        if end - begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if data_start + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has only {size} bytes; "
                f"the file is truncated (an interrupted download or copy?)"
            )
    return header, data_start, size


def load(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy arrays (all, or just `names`), copied out of a memory map."""
    path = Path(path)
    header, data_start, size = read_header(path)
    if size == data_start:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in header if names is None else names:
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = mapped[data_start + begin : data_start + end]
        out[name] = np.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()
    del mapped
    return out


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (C-contiguous copies, in the given order) to a safetensors file at `path`."""
    entries: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r}: dtype {array.dtype} has no safetensors name")
        entries[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array.astype(dtype, copy=False))
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for array in arrays:
            f.write(array.tobytes())
