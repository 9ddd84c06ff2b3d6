"""GGUF files (llama.cpp) of the architectures models/families/ names (llama, qwen2, qwen3) ->
ModelConfig + HF-named fp32 tensors.

Metadata keys are prefixed by the architecture (`qwen2.block_count`). Quantized tensors are dequantized
with the `gguf` package. For llama, llama.cpp's converter permutes the rows of the Q and K projections
so that RoPE rotates adjacent pairs (2i, 2i+1) instead of HF's halves (i, i + H/2); qwen2 and qwen3
keep HF's order (Family.gguf_qk_permuted). Per head, row r = 2i + j of a permuted tensor holds HF
row j*H/2 + i; undoing it is

    W_hf = W_gguf.reshape(n, H/2, 2, D).swapaxes(1, 2).reshape(n*H, D)

with n the number of query heads for Q and of kv heads for K.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from models import families
from models.config import ModelConfig
from models.families import Family
from models.families.llama import LLAMA
from models.errors import UserError


class GGUFError(UserError, ValueError):
    """A GGUF file that is truncated, corrupt, or holds a model we cannot run."""


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader for `path`, with a clear error for missing, foreign, truncated or corrupt files."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as e:
        raise GGUFError(f"cannot read the GGUF file {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the 'GGUF' magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/struct.error on short files
        raise GGUFError(
            f"{path} ({size} bytes) cannot be parsed as GGUF: {type(e).__name__}: {str(e)[:200]}. The file is "
            f"truncated or corrupt (an interrupted download?); fetch it again"
        ) from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFError(
                f"{path}: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes} but the file has "
                f"{size} bytes; the file is truncated"
            )
    return reader


def _field(reader: gguf.GGUFReader, key: str, source: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"{source}: metadata key {key!r} is missing")
        return default
    return field.contents()


def _float32_value(value) -> float:
    """The decimal a float32 metadata value was written from (1e-5, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(reader: gguf.GGUFReader, source: str) -> ModelConfig:
    """ModelConfig from the `<architecture>.*` metadata (Mistral GGUFs use the llama architecture too)."""
    family = gguf_family(reader, source)  # an architecture we read, or a clear error
    arch = family.gguf_architecture
    if f"{arch}.rope.scaling.type" in reader.fields or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"{source}: GGUF rope scaling is not supported; load the model's HF directory instead")
    num_heads = int(_field(reader, f"{arch}.attention.head_count", source))
    hidden = int(_field(reader, f"{arch}.embedding_length", source))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", source,
                          _field(reader, f"{arch}.rope.dimension_count", source, hidden // num_heads)))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{source}: tensor token_embd.weight is missing")
    return ModelConfig(
        vocab_size=int(embed.shape[1]),  # GGUF shapes are innermost-first: [D, V]
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", source)),
        num_layers=int(_field(reader, f"{arch}.block_count", source)),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", source, num_heads)),
        head_dim=head_dim,
        rope_theta=_float32_value(_field(reader, f"{arch}.rope.freq_base", source, 10000.0)),
        rms_norm_eps=_float32_value(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", source)),
        tie_embeddings=tied,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", source, 2048)),
        family=family.name,
    )


def gguf_family(reader: gguf.GGUFReader, source: str) -> Family:
    """The model family (models/families/) of a GGUF file's `general.architecture`."""
    arch = _field(reader, "general.architecture", source)
    family = families.by_gguf_architecture(arch)
    if family is None:
        known = ", ".join(repr(f.gguf_architecture) for f in families.FAMILIES if f.gguf_architecture)
        raise GGUFError(f"{source}: unsupported GGUF architecture {arch!r}; cairl reads {known} GGUF files")
    return family


def hf_name(gguf_name: str, source: str, family: Family = LLAMA) -> str:
    name = family.hf_name_of_gguf(gguf_name)
    if name is None:
        raise GGUFError(f"{source}: unexpected tensor {gguf_name!r} for a {family.name} model")
    return name


def unpermute_rows(w_RxC: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation (see the module docstring)."""
    rows, cols = w_RxC.shape
    return w_RxC.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_tensors(reader: gguf.GGUFReader, config: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """Every weight as an fp32 array in HF naming and [out, in] layout, Q/K un-permuted where llama.cpp permuted them."""
    family = gguf_family(reader, source)
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, source, family)
        shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists the innermost dimension first
        try:
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{source}: tensor {tensor.name} uses {tensor.tensor_type.name}, which gguf cannot dequantize") from None
        w = np.asarray(w, np.float32).reshape(shape)
        if not family.gguf_qk_permuted:
            pass
        elif name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config.num_kv_heads)
        tensors[name] = w
    return tensors


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray], gguf.GGUFReader]:
    """(config, HF-named fp32 tensors, the open reader for the tokenizer) of a GGUF file."""
    reader = open_reader(path)
    config = config_from_gguf(reader, str(path))
    return config, read_tensors(reader, config, str(path)), reader
