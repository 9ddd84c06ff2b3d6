"""Llama (2, 3, and Llama-architecture models such as SmolLM2): checkpoint names."""

from models.families.base import Family

LLAMA = Family(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    hf_model_type="llama",
    hf_global_names={
        "model.embed_tokens.weight": ("embed_VxD",),
        "model.norm.weight": ("final_norm", "scale"),
        "lm_head.weight": ("lm_head_DxV",),
    },
    hf_layer_names={
        "input_layernorm.weight": ("attn_norm", "scale"),
        "self_attn.q_proj.weight": ("attn", "q_DxNxH"),
        "self_attn.k_proj.weight": ("attn", "k_DxKxH"),
        "self_attn.v_proj.weight": ("attn", "v_DxKxH"),
        "self_attn.o_proj.weight": ("attn", "o_NxHxD"),
        "post_attention_layernorm.weight": ("mlp_norm", "scale"),
        "mlp.gate_proj.weight": ("mlp", "gate_DxF"),
        "mlp.up_proj.weight": ("mlp", "up_DxF"),
        "mlp.down_proj.weight": ("mlp", "down_FxD"),
    },
    gguf_architecture="llama",
    gguf_global_names={
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    gguf_layer_names={
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    },
)
