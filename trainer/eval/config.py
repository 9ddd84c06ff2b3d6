"""Evaluation settings (`eval:` in a run config, or `cairl eval`'s flags): typed, validated, no JAX.

Default caps keep a CPU evaluation of a 135M model small; `hhh` and `pm_human` (long contexts) cost the most.
"""

from __future__ import annotations

import dataclasses

from models.errors import UserError

SUITES = ("harmless", "overrefusal", "helpful", "bbq", "hhh", "pm_human")
# Suites that read files the project cannot ship: they need `data_dir`.
DATA_SUITES = {"bbq": "bbq/<Category>.jsonl", "hhh": "cai/evals/438HHHEvaluations.jsonl and HarmfulVsEthical.jsonl",
               "pm_human": "hh-rlhf/harmless-base/test.jsonl.gz and hh-rlhf/helpful-base/test.jsonl.gz"}
PROMPT_SUITES = ("harmless", "overrefusal", "helpful")
TRAIN_MODELS = ("base", "sl", "rl")
DEFAULT_MAX_EXAMPLES = {"harmless": 24, "overrefusal": 24, "helpful": 12, "bbq": 8, "hhh": 24, "pm_human": 12}


class EvalConfigError(UserError, ValueError):
    """Evaluation settings that cannot work."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    suites: tuple[str, ...] = ("harmless", "overrefusal", "helpful")  # the data-free suites by default
    judge: str = ""  # judge model source; empty = the base model
    judge_format: str = "auto"  # auto | choice | llama_guard (auto: llama_guard for Llama-Guard models)
    data_dir: str = ""  # holds bbq/, cai/evals/, hh-rlhf/ (the layout of the public releases)
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)  # suite -> JSONL file replacing its prompts
    # Items per suite (bbq: rows per category; hhh: per file; pm_human: pairs per subset).
    max_examples: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MAX_EXAMPLES))
    max_new_tokens: int = 64  # greedy reply budget
    bootstrap_seed: int = 0
    # The policies `cairl train` evaluates: base (before SL), sl (after SL), rl (after PPO); [] = none.
    train_models: tuple[str, ...] = TRAIN_MODELS

    def __post_init__(self):
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise EvalConfigError(f"eval suites {list(self.suites)}: unknown {unknown or 'none given'}; "
                                  f"known suites: {', '.join(SUITES)}")
        bad_prompts = [s for s in self.prompts if s not in PROMPT_SUITES]
        if bad_prompts:
            raise EvalConfigError(f"eval prompts for {bad_prompts}: only {', '.join(PROMPT_SUITES)} take a prompt file")
        for suite, count in self.max_examples.items():
            if suite not in SUITES or not isinstance(count, int) or count < 1:
                raise EvalConfigError(f"eval max_examples {suite}={count!r}: expected a known suite "
                                      f"({', '.join(SUITES)}) and a count >= 1")
        if self.max_new_tokens < 1:
            raise EvalConfigError(f"eval max_new_tokens must be >= 1, got {self.max_new_tokens}")
        order = [TRAIN_MODELS.index(m) for m in self.train_models if m in TRAIN_MODELS]
        if len(order) != len(self.train_models) or order != sorted(set(order)) or (order and order[0] != 0):
            raise EvalConfigError(f"eval train_models {list(self.train_models)}: expected [] or base followed by sl "
                                  f"and/or rl, in that order (base is what every difference is measured against)")
        if self.judge_format not in ("auto", "choice", "llama_guard"):
            raise EvalConfigError(f"eval judge_format {self.judge_format!r}: expected auto, choice or llama_guard")

    def cap(self, suite: str) -> int:
        return self.max_examples.get(suite, DEFAULT_MAX_EXAMPLES[suite])
