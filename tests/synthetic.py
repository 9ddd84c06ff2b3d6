"""Synthetic PPO batches shared by the step, checkpoint and multi-process tests (and their subprocesses)."""

from __future__ import annotations

import numpy as np


def ppo_batch(rows: int, length: int, seed: int = 0, *, response_start: int = 6, vocab_size: int = 256,
              ragged: bool = False, left_padded: bool = False, old_logprobs=None) -> dict:
    """A PPO batch whose responses start at `response_start`, with log-probs near -5.5 and small values.

    `ragged` ends row 0's response early (at token 12); `left_padded` also masks that tail and row 3's
    first two tokens out of attention, so padding paths are exercised.
    """
    rng = np.random.default_rng(seed)
    response = np.zeros((rows, length), np.float32)
    response[:, response_start:] = 1.0
    attention = np.ones((rows, length), bool)
    if ragged:
        response[0, 12:] = 0.0
    if left_padded:
        attention[0, 12:] = False
        attention[3, :2] = False
    noise = lambda scale: (scale * rng.normal(size=(rows, length))).astype(np.float32)  # noqa: E731
    return {
        "tokens_BxT": rng.integers(0, vocab_size, (rows, length)).astype(np.int32),
        "attention_mask_BxT": attention, "response_mask_BxT": response,
        "old_logprobs_BxT": -5.5 + noise(0.1) if old_logprobs is None else old_logprobs,
        "ref_logprobs_BxT": -5.5 + noise(0.1), "old_values_BxT": noise(0.1),
        "scores_B": rng.normal(size=rows).astype(np.float32),
    }
