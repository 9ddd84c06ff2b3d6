"""Write a model as a Hugging Face directory that `transformers` loads with no custom code.

    out/config.json               LlamaForCausalLM
    out/generation_config.json    bos, eos (every stop id: eos + end-of-turn tokens), pad
    out/model.safetensors         or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    out/tokenizer*.json ...       Tokenizer.save
    out/.cairl-export             marker: this directory was written by cairl export

The directory is assembled beside `out` and renamed into place, so a crash never leaves half an export.
An existing `out` is replaced only when it is empty or holds the marker: a directory someone else wrote
(even a Hugging Face model with its own config.json) is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from models.config import ModelConfig
from models.errors import UserError
from models.hf_io import ParamPath, config_to_hf, params_to_hf, write_weights
from models.tokenizer import Tokenizer, check_vocab_fits

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class ExportError(UserError, OSError):
    """An export destination we cannot write, or a dtype we cannot export to."""


EXPORT_MARKER = ".cairl-export"


@contextlib.contextmanager
def atomic_directory(out: Path, *, replace_marker: str = EXPORT_MARKER) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`, holding `replace_marker`.

    An existing `out` is replaced only when it is empty or a previous result (holds `replace_marker`, which
    only this function writes); any other existing directory is left alone and reported.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is a file; expected a directory path")
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; expected a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / replace_marker).is_file():
        raise ExportError(f"--out {out} exists and holds other files: it was not written by cairl export (no "
                          f"{replace_marker} marker), so it is left as it is; choose an empty or new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror}; choose a writable --out directory") from None
    try:
        yield tmp
        (tmp / replace_marker).write_text("written by cairl export; replaced by the next export here\n",
                                          encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_hf_dir(
    directory: Path,
    config: ModelConfig,
    hf_tensors: Mapping[str, np.ndarray],
    tokenizer: Tokenizer,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 10**9,
) -> list[str]:
    """Write config, generation config, weights (cast to `dtype`) and tokenizer into `directory`."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not supported; expected one of {sorted(EXPORT_DTYPES)}")
    check_vocab_fits(tokenizer, config.vocab_size)
    directory = Path(directory)
    target = EXPORT_DTYPES[dtype]
    tensors = {name: np.asarray(w).astype(target, copy=False) for name, w in hf_tensors.items()}
    hf_config = config_to_hf(config, torch_dtype=dtype, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                             pad_id=tokenizer.pad_id)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
                  "pad_token_id": tokenizer.pad_id}
    files = ["config.json", "generation_config.json"]
    try:
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        files += write_weights(directory, tensors, max_shard_bytes)
    except OSError as e:
        raise ExportError(f"cannot write the model to {directory}: {e.strerror or e}") from None
    files += [os.path.relpath(p, directory) for p in tokenizer.save(directory)]
    return files


def export_params(
    out: str | os.PathLike,
    config: ModelConfig,
    params: Mapping[ParamPath, np.ndarray],
    tokenizer: Tokenizer,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 10**9,
) -> Path:
    """Export our flat numpy params (models/hf_io.py layout) as a HF directory at `out`; returns its path."""
    hf_tensors = params_to_hf(params, config)
    with atomic_directory(Path(out)) as tmp:
        write_hf_dir(tmp, config, hf_tensors, tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return Path(out).absolute()
