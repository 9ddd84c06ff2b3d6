"""Model shapes and numerics, validated on construction, with presets for known models."""

from __future__ import annotations

import dataclasses

from models import families
from models.errors import UserError
from typing import Literal, get_args

DType = Literal["float32", "bfloat16", "float16"]
# How full-sequence attention (training, scoring, prefill without a cache) is computed: "xla" is
# the portable einsum + softmax; "cudnn" is cuDNN's fused flash attention (NVIDIA GPUs, 16-bit
# compute dtypes), which never materialises the T x T scores. Cached decode always uses "xla".
AttentionImpl = Literal["xla", "cudnn"]


class ModelConfigError(UserError, ValueError):
    """A model configuration that cannot describe a working model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0:
            raise ModelConfigError(f"rope scaling factors must be positive, got {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ModelConfigError(
                f"rope scaling needs high_freq_factor > low_freq_factor, got {self}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-family decoder (Llama 2/3, Mistral without sliding window, SmolLM2, Qwen2/2.5, Qwen3).

    `family` names the checkpoint layout (models/families/): it decides the few structural extras
    (Qwen2's q/k/v biases, Qwen3's per-head q/k norms) and the architecture an export declares.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: DType = "float32"  # compute dtype of activations and matmuls
    param_dtype: DType = "float32"  # master copy of the weights
    remat: bool = False  # recompute each block's activations in the backward pass
    # Full sequences (training, scoring) run the blocks as one `lax.scan` over their parameters stacked
    # per step: XLA compiles one block instead of num_layers (deep models compile minutes faster). The
    # parameter tree keeps one entry per layer (checkpoints and HF names unchanged); the stacked copy
    # costs one extra parameter-sized buffer. Cached decode stays unrolled.
    scan_layers: bool = False
    attention: AttentionImpl = "xla"
    family: str = "llama"

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"model config: hidden_size ({self.hidden_size}) is not divisible by "
                f"num_heads ({self.num_heads}); set head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ModelConfigError(f"model config: head_dim must be even for RoPE, got {self.resolved_head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ModelConfigError(
                    f"model config: {name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}"
                )
        if self.attention not in get_args(AttentionImpl):
            raise ModelConfigError(f"model config: attention must be one of {get_args(AttentionImpl)}, got {self.attention!r}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ModelConfigError("model config: attention 'cudnn' needs a 16-bit dtype (bfloat16 or float16), got float32")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ModelConfigError("model config: rope_theta and rms_norm_eps must be positive")
        if families.by_name(self.family) is None:
            raise ModelConfigError(f"model config: family must be one of "
                                   f"{', '.join(f.name for f in families.FAMILIES)}, got {self.family!r}")

    @property
    def qkv_bias(self) -> bool:
        return families.by_name(self.family).qkv_bias

    @property
    def qk_norm(self) -> bool:
        return families.by_name(self.family).qk_norm

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hd = self.resolved_head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += hd * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        block = attn + 3 * d * f + 2 * d
        lm_head = 0 if self.tie_embeddings else v * d
        return v * d + self.num_layers * block + d + lm_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"model config: unknown keys {unknown}; expected some of {sorted(known)}")
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # For tests: every code path (GQA, tied embeddings, RoPE) at a size that compiles in seconds.
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        tie_embeddings=True,
        max_position_embeddings=512,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_embeddings=True,
        max_position_embeddings=131072,
    ),
    # Qwen shapes (their config.json files): `cairl plan` and `cairl bench` without the weights.
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        max_position_embeddings=32768,
        family="qwen2",
    ),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        max_position_embeddings=40960,
        family="qwen3",
    ),
    "llama-3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        tie_embeddings=False,
        max_position_embeddings=8192,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
