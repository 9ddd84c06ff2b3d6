"""Qwen3 (dense): Llama's layout plus an RMSNorm over head_dim on every query and key head, applied
after the projection and before RoPE (one scale vector of length head_dim per layer, shared by the
heads). No projection biases. llama.cpp's 'qwen3' GGUFs keep HF's Q/K row order, like qwen2's."""

import dataclasses

from models.families.llama import LLAMA

QWEN3 = dataclasses.replace(
    LLAMA,
    name="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    hf_model_type="qwen3",
    hf_layer_names={
        **LLAMA.hf_layer_names,
        "self_attn.q_norm.weight": ("attn", "q_norm", "scale"),
        "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
    },
    gguf_architecture="qwen3",
    gguf_layer_names={
        **LLAMA.gguf_layer_names,
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
    },
    qk_norm=True,
    gguf_qk_permuted=False,
    hf_config_extras={"sliding_window": None, "use_sliding_window": False},
)
