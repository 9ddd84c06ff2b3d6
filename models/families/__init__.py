"""Model families: each architecture's checkpoint names in one place.

A family says how a checkpoint of that architecture names our parameters: Hugging Face safetensors
names (`model.layers.3.self_attn.q_proj.weight` → `("blocks", 3, "attn", "q_DxNxH")`) and GGUF
names (`blk.3.attn_q.weight` → the HF name), plus the config.json quirks the loader must honour.
models/hf_io.py and models/gguf_io.py read these tables and nothing else about an architecture.

A new family is one module here defining a `Family`, plus its entry in `FAMILIES` below.
"""

from __future__ import annotations

from models.families.base import Family, ParamPath
from models.families.llama import LLAMA
from models.families.mistral import MISTRAL
from models.families.qwen2 import QWEN2
from models.families.qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)

__all__ = ["FAMILIES", "Family", "ParamPath", "by_name", "by_hf_architecture", "by_hf_model_type",
           "by_gguf_architecture"]


def by_name(name: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)


def by_hf_architecture(architecture: str) -> Family | None:
    return next((f for f in FAMILIES if f.hf_architecture == architecture), None)


def by_hf_model_type(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES if f.hf_model_type == model_type), None)


def by_gguf_architecture(architecture: str | None) -> Family | None:
    return next((f for f in FAMILIES if f.gguf_architecture == architecture), None)
