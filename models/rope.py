"""Rotary position embeddings (RoPE), including Llama-3 frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """inv_freq_i = theta^(-2i/d) for i < d/2, rescaled per Llama 3 when `scaling` is set.

    Llama-3 scaling keeps high frequencies (wavelength < L/high_freq_factor) unchanged, divides low
    frequencies (wavelength > L/low_freq_factor) by `factor`, and interpolates smoothly between the
    two bands, where L is the original training context length.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = context / scaling.low_freq_factor
    high_freq_wavelength = context / scaling.high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_between = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_between, interpolated, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH: jnp.ndarray, positions_BxT: jnp.ndarray, inv_freq) -> jnp.ndarray:
    """Rotate pairs (x_i, x_{i+d/2}) by angle position * inv_freq_i (the "rotate half" layout of HF Llama)."""
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles_BxTxH = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTxH).astype(x_BxTxNxH.dtype), jnp.sin(angles_BxTxH).astype(x_BxTxNxH.dtype)
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    return x_BxTxNxH * cos + rotated * sin
