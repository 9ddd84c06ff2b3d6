"""Qwen2 and Qwen2.5: Llama's layout plus biases on the q, k and v projections (o has none).

llama.cpp names the architecture 'qwen2' and keeps HF's Q/K row order (its RoPE for qwen2 is NeoX-style,
the same rotate-half pairing as HF), so its GGUF tensors need no un-permuting.
"""

import dataclasses

from models.families.llama import LLAMA

QWEN2 = dataclasses.replace(
    LLAMA,
    name="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    hf_model_type="qwen2",
    hf_layer_names={
        **LLAMA.hf_layer_names,
        "self_attn.q_proj.bias": ("attn", "q_bias_NxH"),
        "self_attn.k_proj.bias": ("attn", "k_bias_KxH"),
        "self_attn.v_proj.bias": ("attn", "v_bias_KxH"),
    },
    gguf_architecture="qwen2",
    gguf_layer_names={
        **LLAMA.gguf_layer_names,
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
    },
    qkv_bias=True,
    gguf_qk_permuted=False,
    hf_config_extras={"sliding_window": None, "use_sliding_window": False},
)
