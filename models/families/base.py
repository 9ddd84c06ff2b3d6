"""What a model family declares (see models/families/__init__.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_architecture: str  # config.json "architectures"[0]
    hf_model_type: str  # config.json "model_type" (configs saved without "architectures")
    hf_global_names: Mapping[str, ParamPath]  # HF tensor name -> our path outside the layers (the first before them)
    hf_layer_names: Mapping[str, tuple[str, ...]]  # name after "model.layers.<i>." -> path after ("blocks", i)
    gguf_architecture: str | None  # GGUF "general.architecture" read as this family (None: never)
    gguf_global_names: Mapping[str, str]  # GGUF tensor name -> HF tensor name, outside the layers
    gguf_layer_names: Mapping[str, str]  # name after "blk.<i>." -> name after "model.layers.<i>."
    sliding_window_caps_context: bool = False  # config.json "sliding_window" < positions caps the context
    # Structure beyond Llama's (models/llama.py builds what ModelConfig.family's entry asks for):
    qkv_bias: bool = False  # q, k and v projections carry biases (Qwen2); o never does
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3)
    # llama.cpp's converter permutes Q/K rows only for architectures it runs with GPT-J-style RoPE
    # (llama); NeoX-style ones (qwen2, qwen3) keep HF's row order (see models/gguf_io.py).
    gguf_qk_permuted: bool = True
    # Written into an exported config.json over the defaults transformers would fill in: our context is
    # capped at any sliding window on import, so an export declares full attention.
    hf_config_extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def hf_names(self, num_layers: int, tie_embeddings: bool) -> dict[str, ParamPath]:
        """HF tensor name -> our parameter path, for every weight (the LM head only when untied), in HF's
        order: the embedding, the layers, the rest."""
        globals_ = [(name, path) for name, path in self.hf_global_names.items()
                    if not (tie_embeddings and path == ("lm_head_DxV",))]
        names = dict(globals_[:1])
        for i in range(num_layers):
            names.update({f"model.layers.{i}.{name}": ("blocks", i, *path) for name, path in self.hf_layer_names.items()})
        names.update(globals_[1:])
        return names

    def hf_name_of_gguf(self, gguf_name: str) -> str | None:
        """The HF name of a GGUF tensor name, None for a name this family does not have."""
        if gguf_name in self.gguf_global_names:
            return self.gguf_global_names[gguf_name]
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in self.gguf_layer_names:
            return f"model.layers.{parts[1]}.{self.gguf_layer_names[parts[2]]}"
        return None
