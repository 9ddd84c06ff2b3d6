"""What the driver and the learner actor exchange: small typed values, plain enough for Ray to pickle.

No JAX here: the driver builds these without a backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Metrics = dict[str, Any]  # metric name -> float (PPO adds the per-rollout `scores` list)


@dataclasses.dataclass(frozen=True)
class StageStart:
    """A stage learner after `setup`: the update step it continues from and what its checkpoint held."""

    step: int  # 0 for a fresh stage
    extras: dict  # the driver's own resume data saved with the checkpoint (iteration, version, evaluations)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison for the preference model."""

    prompt: str
    response_a: str
    response_b: str
    p_a: float  # soft label: probability that response_a is the better answer

    @classmethod
    def from_record(cls, record: dict) -> "PreferencePair":
        """From a line of samples/labels.jsonl."""
        return cls(record["prompt"], record["response_a"], record["response_b"], float(record["p_a"]))


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    train: tuple[PreferencePair, ...]
    heldout: tuple[PreferencePair, ...]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One sampled response: prompt and response token ids, and the behaviour policy's log-probs of the response."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]

    @classmethod
    def from_record(cls, record: dict) -> "Rollout":
        """From a line of samples/rollouts.jsonl (a rollout task's record)."""
        return cls(tuple(record["prompt_ids"]), tuple(record["response_ids"]), tuple(record["logprobs"]))

    @classmethod
    def group_from_record(cls, record: dict) -> list["Rollout"]:
        """The G rollouts of one prompt from a `group` task's record (samples/rollouts.jsonl), in sampled order."""
        return [cls(tuple(record["prompt_ids"]), tuple(ids), tuple(lps))
                for ids, lps in zip(record["group_response_ids"], record["group_logprobs"], strict=True)]
