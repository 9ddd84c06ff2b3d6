"""Evaluation inside `cairl train`: the suites' models and judge backed by the rollout workers.

A policy version is seen by the suites as a `ModelUnderTest` whose `generate` and `scorer` send
`reply` and `options` tasks through the worker pool, batched and fault-handled like every other
stage. Each call's results are completed in a ledger under run_dir/eval/ledgers/<tag>-*.jsonl, keyed
by a hash of what was asked, so an evaluation stopped by a kill resumes without redoing finished
items, and a baseline's replies are read back, not regenerated, when a later policy is compared to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from trainer.data.records import Prompt
from trainer.eval.suites import ModelUnderTest, memoized
from trainer.feedback import per_context_options
from trainer.ledger import Ledger, read_records
from trainer.weights import WeightHandle


@dataclasses.dataclass(frozen=True)
class ReplySettings:
    """A `reply` task: greedy chat replies of the task's policy version."""

    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class OptionSettings:
    """An `options` task: log p(option | context) for each context (task texts) and its options.

    target: "policy" scores with the task's policy version; "judge" with the evaluation judge
    (eval.judge, default the run's base model), whatever version the policy is at.
    """

    target: Literal["policy", "judge"]
    options: dict[str, tuple[str, ...]]  # uid -> that context's options


def item_uid(*parts: str) -> str:
    """A ledger uid fixed by what is asked (the same question is answered once per policy version)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


class PoolModel:
    """One policy version on the rollout workers. `weights` is called only when some item is not yet in
    the ledgers, so a finished evaluation costs no weight transfer."""

    def __init__(self, ctx, tag: str, weights: Callable[[], WeightHandle], max_new_tokens: int):
        self.ctx = ctx
        self.tag = tag
        self.max_new_tokens = max_new_tokens
        self._weights_fn = weights
        self._weights: WeightHandle | None = None
        self.dir = ctx.run_dir / "eval" / "ledgers"

    def _ask(self, name: str, items: dict[str, str], kind: str, settings, field: str) -> dict[str, object]:
        """uid -> `field` of each record of `items` (uid -> text), dispatching only the missing ones."""
        from trainer.stages.common import dispatch_prompts

        path = self.dir / f"{self.tag}-{name}.jsonl"
        ledger = Ledger.open(path, list(items), strict=False)
        if not ledger.finished:
            if self._weights is None:
                self._weights = self._weights_fn()
            prompts = {uid: Prompt(uid=uid, text=text) for uid, text in items.items()}
            dispatch_prompts(self.ctx, "eval", ledger, prompts, kind, settings, self._weights,
                             desc=f"eval {self.tag} {name}")
        return {r["uid"]: r[field] for r in read_records(path) if r["uid"] in items}

    def generate(self, prompts: Sequence[str]) -> list[str]:
        uids = {text: item_uid("reply", str(self.max_new_tokens), text) for text in prompts}
        replies = self._ask("replies", {uid: text for text, uid in uids.items()}, "reply",
                            ReplySettings(self.max_new_tokens), "reply")
        return [replies[uids[text]] for text in prompts]

    def score(self, target: str, contexts: Sequence[str], options) -> np.ndarray:
        rows = per_context_options(contexts, options)
        uids = [item_uid("options", target, context, *row) for context, row in zip(contexts, rows)]
        settings = OptionSettings(target, {uid: tuple(row) for uid, row in zip(uids, rows)})
        scores = self._ask(f"{target}-scores", dict(zip(uids, contexts)), "options", settings, "logprobs")
        return np.asarray([scores[uid] for uid in uids], np.float64)

    def under_test(self, source: str, tokenizer) -> ModelUnderTest:
        return ModelUnderTest(source=source, generate=memoized(self.generate),
                              scorer=PoolScorer(self, "policy", tokenizer))


class PoolScorer:
    """An `OptionScorer` whose scoring runs on the workers; chats are rendered here with the scoring
    model's tokenizer (the worker would render them the same way)."""

    def __init__(self, model: PoolModel, target: str, tokenizer):
        self.model = model
        self.target = target
        self.tokenizer = tokenizer

    def render(self, chat) -> str:
        return self.tokenizer.render_chat(chat, add_generation_prompt=True)

    def score(self, contexts: Sequence[str], options) -> np.ndarray:
        return self.model.score(self.target, contexts, options)
