"""FLOP counts of the model's programs and a roofline time estimate. Estimates, not measurements.

Notation: L layers, D hidden, F mlp, V vocab, N query heads, K kv heads, H head dim; B rows of T
tokens attending to S key slots.

    matmul params  M = L·(D·H·(2N + 2K) + 3·D·F) [+ D·V with the LM head]
    forward        2·M·B·T + 4·L·B·T·S·N·H          (projections; QKᵀ and A·V over all S slots)
    train step     3 × forward  (+1 forward with remat: the backward pass recomputes the blocks)
    sampling       forward(B, P, S=P) + n · (2·M·B + 4·L·B·(P + n)·N·H)   (prefill, then n decode steps)

    time ≈ max(FLOPs per device / peak FLOP/s, bytes per device / HBM bandwidth)

where bytes counts every buffer of the program once (arguments, outputs, temporaries) and, for the
decode loop, the weights and KV cache once per step. Real steps are slower (collectives, non-matmul
work, imperfect overlap): read the figure as a lower bound good to about 2×.
"""

from __future__ import annotations

from models.config import ModelConfig


def matmul_params(model: ModelConfig, lm_head: bool) -> int:
    d, f, h = model.hidden_size, model.intermediate_size, model.resolved_head_dim
    block = d * h * (2 * model.num_heads + 2 * model.num_kv_heads) + 3 * d * f
    return model.num_layers * block + (d * model.vocab_size if lm_head else 0)


def _attention_flops(model: ModelConfig, rows: int, queries: int, keys: int) -> float:
    return 4.0 * model.num_layers * rows * queries * keys * model.num_heads * model.resolved_head_dim


def forward_flops(model: ModelConfig, rows: int, length: int, lm_head: bool) -> float:
    return 2.0 * matmul_params(model, lm_head) * rows * length + _attention_flops(model, rows, length, length)


def train_flops(model: ModelConfig, rows: int, length: int, lm_head: bool) -> float:
    return (4.0 if model.remat else 3.0) * forward_flops(model, rows, length, lm_head)


def sample_flops(model: ModelConfig, rows: int, prompt: int, new: int) -> float:
    prefill = forward_flops(model, rows, prompt, lm_head=True)
    decode = new * (2.0 * matmul_params(model, lm_head=True) * rows + _attention_flops(model, rows, 1, prompt + new))
    return prefill + decode


def roofline_seconds(flops_per_device: float, bytes_per_device: float, peak_flops: float | None,
                     bandwidth: float | None) -> float | None:
    """max(compute time, memory time); None when the chip's figures are unknown (a CPU)."""
    if not peak_flops or not bandwidth:
        return None
    return max(flops_per_device / peak_flops, bytes_per_device / bandwidth)
