"""AI feedback (RLAIF labels): which of two answers better follows a sampled principle, as a soft label.

For each pair of answers to a prompt, k comparison principles are sampled (seeded by the prompt's
uid). For each, the feedback model reads the multiple-choice question (trainer/prompts.py) and the
probability of each option comes from the log-probability of its continuation (" (A)", " (B)")
after "The answer is:", normalised over the options. Optionally:
  * the answer order is debiased: the question is also asked with (A)/(B) swapped and the two
    estimates of p(first answer better) are averaged;
  * chain-of-thought: the feedback model first writes its reasoning (generated), then the options
    are scored after "So the answer is:"; such probabilities are clamped (the CAI paper clamps CoT
    labels to 40-60%, because CoT makes them overconfident).
The per-principle probabilities are averaged over the k principles (ensembling).

    scorer = LlamaOptionScorer(model, tokenizer)
    labels = label_pairs(pairs, constitution, scorer, FeedbackConfig(num_principles=4))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import UserError
from trainer.constitution import Constitution, Principle
from trainer.critique import TextGenerator, seeded_rng
from trainer.prompts import (
    ANSWER_PREFIX,
    COT_ANSWER_PREFIX,
    Chat,
    comparison_question,
    cut_at_markers,
    feedback_chat,
    feedback_few_shot,
    options,
    prompt_messages,
    strip_leading_label,
)


class FeedbackError(UserError, ValueError):
    """Feedback settings or inputs that cannot produce labels."""


# -- math -----------------------------------------------------------------------------------------
def option_probabilities(logprobs_NxO: np.ndarray) -> np.ndarray:
    """Normalise option log-probabilities over the options: p_o = exp(l_o) / sum_j exp(l_j) (a softmax)."""
    logprobs_NxO = np.asarray(logprobs_NxO, np.float64)
    shifted = logprobs_NxO - logprobs_NxO.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def debias_order(p_a_when_first_N: np.ndarray, p_a_when_second_N: np.ndarray) -> np.ndarray:
    """p(a better) from both orders: (p(A | a shown as A) + p(B | a shown as B)) / 2, cancelling a position bias."""
    return 0.5 * (np.asarray(p_a_when_first_N) + np.asarray(p_a_when_second_N))


def clamp_probability(p: np.ndarray, low: float, high: float) -> np.ndarray:
    """min(max(p, low), high): keeps overconfident (chain-of-thought) labels soft."""
    return np.clip(p, low, high)


def ensemble(per_principle_NxK: np.ndarray) -> np.ndarray:
    """Mean over the k principles: p = (1/k) sum_j p_j."""
    return np.mean(per_principle_NxK, axis=-1)


# -- the scoring interface ------------------------------------------------------------------------
class OptionScorer(Protocol):
    """A feedback model seen from outside: render a chat, and score option continuations of contexts."""

    def render(self, chat: Chat) -> str:
        """The text the model sees before it writes its reply to `chat` (chat template + generation prompt)."""

    def score(self, contexts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """[n, n_options] float: log p(option | context) = sum of the option tokens' log-probs."""


def _power_of_two_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _option_logprobs(graphdef, state, tokens_BxL, mask_BxL, predict_at_BxK, targets_BxK, target_mask_BxK):
    """sum_k log p(targets[b, k] | tokens[b, :predict_at[b, k] + 1]) over valid k: teacher forcing.

    Logits are computed only at the K positions that predict option tokens (not over the whole
    sequence), which keeps the [B, K, V] log-softmax small for large vocabularies.
    """
    model = nnx.merge(graphdef, state)
    hidden_BxLxD, _ = model.hidden(tokens_BxL, mask_BxL)
    picked_BxKxD = jnp.take_along_axis(hidden_BxLxD, predict_at_BxK[..., None], axis=1)
    logp_BxKxV = jax.nn.log_softmax(model.logits(picked_BxKxD), axis=-1)
    token_logp_BxK = jnp.take_along_axis(logp_BxKxV, targets_BxK[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_mask_BxK, token_logp_BxK, 0.0), axis=-1)


class LlamaOptionScorer:
    """`OptionScorer` on a models.llama.Llama + Tokenizer: a jitted teacher-forced forward pass.

    Each (context, option) pair is one right-padded row; rows are batched `batch_size` at a time
    and padded to power-of-two lengths, so a handful of shapes are compiled.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, min_length: int = 64):
        if batch_size < 1:
            raise FeedbackError(f"option scorer: batch_size must be >= 1, got {batch_size}")
        self.config = model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.min_length = min_length
        self._graphdef, self._state = nnx.split(model)
        self._program = jax.jit(_option_logprobs, static_argnums=(0,))

    def update_weights(self, model) -> None:
        self._graphdef, self._state = nnx.split(model)

    def render(self, chat: Chat) -> str:
        return self.tokenizer.render_chat(chat, add_generation_prompt=True)

    def score(self, contexts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        if not options:
            raise FeedbackError("option scorer: give at least one option")
        option_ids = [self.tokenizer.encode(o) for o in options]
        empty = [o for o, ids in zip(options, option_ids) if not ids]
        if empty:
            raise FeedbackError(f"option scorer: options {empty!r} encode to no tokens")
        rows = []  # (context ids, option ids)
        for context in contexts:
            context_ids = self.tokenizer.encode(context, add_bos=self.tokenizer.add_bos_token)
            if not context_ids:
                raise FeedbackError("option scorer: a context encodes to no tokens; a context must hold some text")
            rows += [(context_ids, ids) for ids in option_ids]
        longest = max(len(c) + len(o) for c, o in rows) if rows else 0
        if longest > self.config.max_position_embeddings:
            raise FeedbackError(
                f"option scorer: a context plus option has {longest} tokens, more than the model's "
                f"max_position_embeddings {self.config.max_position_embeddings}; use fewer few-shot examples or shorter answers"
            )
        scores = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            scores[start : start + len(chunk)] = self._score_chunk(chunk)
        return scores.reshape(len(contexts), len(options))

    def _score_chunk(self, chunk) -> np.ndarray:
        length = _power_of_two_at_least(max(len(c) + len(o) for c, o in chunk), self.min_length)
        length = min(length, self.config.max_position_embeddings)
        num_option = _power_of_two_at_least(max(len(o) for _, o in chunk), 4)
        batch = self.batch_size
        tokens = np.full((batch, length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((batch, length), np.bool_)
        predict_at = np.zeros((batch, num_option), np.int32)
        targets = np.zeros((batch, num_option), np.int32)
        target_mask = np.zeros((batch, num_option), np.bool_)
        mask[:, 0] = True  # batch-padding rows: one dummy token, no targets
        for row, (context_ids, option_ids) in enumerate(chunk):
            sequence = context_ids + option_ids
            tokens[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = True
            k = len(option_ids)
            # The hidden state at position t predicts token t + 1.
            predict_at[row, :k] = np.arange(len(context_ids) - 1, len(context_ids) - 1 + k)
            targets[row, :k] = option_ids
            target_mask[row, :k] = True
        out = self._program(self._graphdef, self._state, tokens, mask, predict_at, targets, target_mask)
        return np.asarray(out)[: len(chunk)]


# -- labelling ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
    """How preference labels are made."""

    num_principles: int = 4  # k comparison principles per pair, averaged (ensembling)
    num_few_shot: int = 2  # feedback examples shown before each question (0 = none)
    debias_order: bool = True  # also ask with the answers swapped and average
    chain_of_thought: bool = False  # generate reasoning before scoring (needs a generator)
    cot_tokens: int = 96  # reasoning budget
    cot_clamp: tuple[float, float] | None = (0.4, 0.6)  # clamp CoT probabilities to [low, high]; None = no clamp
    seed: int = 0  # principle sampling

    def __post_init__(self):
        if self.num_principles < 1:
            raise FeedbackError(f"feedback: num_principles must be >= 1, got {self.num_principles}")
        if self.num_few_shot < 0 or self.cot_tokens < 1:
            raise FeedbackError("feedback: num_few_shot must be >= 0 and cot_tokens >= 1")
        if self.cot_clamp is not None:
            low, high = self.cot_clamp
            if not 0.0 <= low <= 0.5 <= high <= 1.0:
                raise FeedbackError(f"feedback: cot_clamp must be [low, high] with 0 <= low <= 0.5 <= high <= 1, got {self.cot_clamp}")


@dataclasses.dataclass(frozen=True)
class ResponsePair:
    """Two answers to one prompt, to be compared."""

    uid: str
    prompt: str
    response_a: str
    response_b: str


@dataclasses.dataclass(frozen=True)
class LabelRecord:
    """One AI preference label; `to_json()` is one line of samples/labels.jsonl."""

    uid: str
    prompt: str
    response_a: str
    response_b: str
    p_a: float  # soft label: probability that response_a is the better answer
    principle_ids: tuple[str, ...]
    per_principle_probs: tuple[float, ...]  # p_a under each principle, after debiasing and clamping
    constitution_hash: str
    reasoning: tuple[str, ...] = ()  # chain-of-thought texts, when used

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LabelRecord":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def sample_comparison_principles(constitution: Constitution, seed: int, uid: str, k: int) -> list[Principle]:
    """k distinct comparison principles for prompt `uid` (all of them if there are fewer than k)."""
    pool = list(constitution.comparison_principles)
    return pool if k >= len(pool) else seeded_rng(seed, uid, "comparison").sample(pool, k)


def clean_reasoning(text: str) -> str:
    """Generated reasoning, cut before the model states its answer (the scored continuation decides it)."""
    text = cut_at_markers(strip_leading_label(text))
    lowered = text.lower()
    found = [lowered.find(p) for p in ("therefore, the answer", "so the answer", "the answer is")]
    cut = min((i for i in found if i >= 0), default=len(text))
    return text[:cut].strip()


@dataclasses.dataclass(frozen=True)
class _Question:
    pair: int  # index into the pairs
    slot: int  # principle slot j < k
    swapped: bool  # response_b shown as (A)


def comparison_probabilities(
    questions: Sequence[tuple[Chat, Sequence[str], str]],
    scorer: OptionScorer,
    *,
    few_shot: Chat = (),
    chain_of_thought: bool = False,
    generator: TextGenerator | None = None,
    cot_tokens: int = 96,
) -> tuple[np.ndarray, list[str]]:
    """p(option) for each (conversation, answers, comparison) question: [n, n_answers], plus CoT reasoning texts."""
    if not questions:
        return np.zeros((0, 2)), []
    chats = [feedback_chat(comparison_question(conv, answers, comparison, chain_of_thought), few_shot)
             for conv, answers, comparison in questions]
    if chain_of_thought:
        if generator is None:
            raise FeedbackError("feedback: chain_of_thought needs a generator to write the reasoning")
        reasoning = [clean_reasoning(t) for t in generator.generate(chats, cot_tokens)]
        contexts = [scorer.render(chat) + text + COT_ANSWER_PREFIX for chat, text in zip(chats, reasoning)]
    else:
        reasoning = []
        contexts = [scorer.render(chat) + ANSWER_PREFIX for chat in chats]
    counts = {len(answers) for _, answers, _ in questions}
    if len(counts) != 1:
        raise FeedbackError(f"feedback: every question in a batch needs the same number of answers, got {sorted(counts)}")
    logprobs = scorer.score(contexts, options(counts.pop()))
    return option_probabilities(logprobs), reasoning


def label_pairs(
    pairs: Sequence[ResponsePair],
    constitution: Constitution,
    scorer: OptionScorer,
    config: FeedbackConfig = FeedbackConfig(),
    generator: TextGenerator | None = None,
) -> list[LabelRecord]:
    """Soft preference labels for `pairs`: one scorer call (and one generator call with CoT) for the whole batch."""
    if not pairs:
        return []
    if config.chain_of_thought and generator is None:
        raise FeedbackError("feedback: chain_of_thought needs a generator to write the reasoning")
    principles = [sample_comparison_principles(constitution, config.seed, p.uid, config.num_principles) for p in pairs]
    few_shot = feedback_few_shot(constitution, config.num_few_shot, config.chain_of_thought)
    jobs: list[_Question] = []
    questions = []
    for i, pair in enumerate(pairs):
        conversation = prompt_messages(pair.prompt)
        for j, principle in enumerate(principles[i]):
            for swapped in (False, True) if config.debias_order else (False,):
                answers = (pair.response_b, pair.response_a) if swapped else (pair.response_a, pair.response_b)
                jobs.append(_Question(i, j, swapped))
                questions.append((conversation, answers, principle.comparison))
    probs_Mx2, reasoning = comparison_probabilities(
        questions, scorer, few_shot=few_shot, chain_of_thought=config.chain_of_thought, generator=generator,
        cot_tokens=config.cot_tokens,
    )

    # p(response_a better) per question: option A unless the answers were swapped.
    p_a_M = np.where([job.swapped for job in jobs], probs_Mx2[:, 1], probs_Mx2[:, 0])
    k_max = max(len(p) for p in principles)
    sums = np.zeros((len(pairs), k_max, 2))  # [pair, slot, order]
    for job, p_a in zip(jobs, p_a_M):
        sums[job.pair, job.slot, int(job.swapped)] = p_a
    per_principle = debias_order(sums[..., 0], sums[..., 1]) if config.debias_order else sums[..., 0]
    if config.chain_of_thought and config.cot_clamp is not None:
        per_principle = clamp_probability(per_principle, *config.cot_clamp)

    records = []
    reasoning_by_pair: list[list[str]] = [[] for _ in pairs]
    for job, text in zip(jobs, reasoning):
        reasoning_by_pair[job.pair].append(text)
    for i, pair in enumerate(pairs):
        k = len(principles[i])
        probs = per_principle[i, :k]
        records.append(LabelRecord(
            uid=pair.uid,
            prompt=pair.prompt,
            response_a=pair.response_a,
            response_b=pair.response_b,
            p_a=float(ensemble(probs)),
            principle_ids=tuple(p.id for p in principles[i]),
            per_principle_probs=tuple(float(p) for p in probs),
            constitution_hash=constitution.hash,
            reasoning=tuple(reasoning_by_pair[i]),
        ))
    return records
