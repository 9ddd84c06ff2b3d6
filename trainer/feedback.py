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

`scoring="contrast"` is an alternative for feedback models too small for lettered multiple choice
(SmolLM2-135M scores "(A)" vs "(B)" at chance even on "What is the capital of France?"): each
answer r is scored by how much more likely it is when the user asked for a reply that follows the
principle than when they asked for one that breaks it,
    s(r) = log p(r | conversation + good_instruction) - log p(r | conversation + bad_instruction),
and p(a better) = sigmoid(s(a) - s(b)). Principles need good_instruction / bad_instruction for it.

    scorer = LlamaOptionScorer(model, tokenizer)
    labels = label_pairs(pairs, constitution, scorer, FeedbackConfig(principles_per_pair=4), seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import UserError
from models.llama import KVCache, default_positions
from models.sampling import logprobs_and_entropy
from trainer.configlib import FieldError
from trainer.constitution import Constitution, Principle
from trainer.critique import TextGenerator, seeded_rng
from trainer.prompts import (
    ANSWER_PREFIX,
    COT_ANSWER_PREFIX,
    Chat,
    comparison_question,
    contrast_chat,
    cut_at_markers,
    feedback_chat,
    feedback_few_shot,
    options,
    prompt_messages,
    strip_leading_label,
)


class FeedbackError(UserError, ValueError):
    """Feedback settings or inputs that cannot produce labels."""


class FeedbackConfigError(FieldError, FeedbackError):
    """A `label` setting (or combination) that cannot work; `key` names it."""


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


def contrastive_probability(logp_good_Nx2: np.ndarray, logp_bad_Nx2: np.ndarray) -> np.ndarray:
    """p(a better) = sigmoid(s_a - s_b) with s_r = log p(r | good instruction) - log p(r | bad instruction).

    Columns are (a, b). The sigmoid is written as (1 + tanh(x / 2)) / 2, which cannot overflow.
    """
    s_Nx2 = np.asarray(logp_good_Nx2, np.float64) - np.asarray(logp_bad_Nx2, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * (s_Nx2[:, 0] - s_Nx2[:, 1])))


def ensemble(per_principle_NxK: np.ndarray) -> np.ndarray:
    """Mean over the k principles: p = (1/k) sum_j p_j."""
    return np.mean(per_principle_NxK, axis=-1)


# -- the scoring interface ------------------------------------------------------------------------
class OptionScorer(Protocol):
    """A feedback model seen from outside: render a chat, and score option continuations of contexts."""

    def render(self, chat: Chat) -> str:
        """The text the model sees before it writes its reply to `chat` (chat template + generation prompt)."""

    def score(self, contexts: Sequence[str], options: Sequence[str] | Sequence[Sequence[str]]) -> np.ndarray:
        """[n, n_options] float: log p(option | context) = sum of the option tokens' log-probs.

        `options` is one list shared by every context, or one list per context (same length each).
        """


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _option_logprobs(graphdef, state, context_BxP, context_mask_BxP, options_BxOxK, options_mask_BxOxK):
    """[B, O]: sum_k log p(option[b, o, k] | context_b, option[b, o, :k]) over the option's real tokens (teacher forcing).

    Contexts are left-padded, so every context ends at slot P-1; the context is run once into a KV
    cache, then each option's K tokens run against that cache at slots P..P+K-1 (the cache is a
    value, so every option sees the context alone). The hidden state that predicts option token k
    is the context's last one for k = 0 and option token k-1's otherwise. Logits are formed only
    there, keeping the [B, K, V] pass small for large vocabularies.
    """
    model = nnx.merge(graphdef, state)
    batch, prompt_slots = context_BxP.shape
    num_options, option_slots = options_BxOxK.shape[1:]
    cache = KVCache.zeros(model.config, batch, prompt_slots + option_slots)
    hidden_BxPxD, cache = model.hidden(context_BxP, context_mask_BxP, default_positions(context_mask_BxP), cache, 0)
    context_len_B = jnp.sum(context_mask_BxP, axis=-1, dtype=jnp.int32)
    positions_BxK = context_len_B[:, None] + jnp.arange(option_slots, dtype=jnp.int32)[None, :]
    scores = []
    for o in range(num_options):
        tokens_BxK, mask_BxK = options_BxOxK[:, o], options_mask_BxOxK[:, o]
        option_hidden_BxKxD, _ = model.hidden(tokens_BxK, mask_BxK, positions_BxK, cache, prompt_slots)
        predictors_BxKxD = jnp.concatenate([hidden_BxPxD[:, -1:], option_hidden_BxKxD[:, :-1]], axis=1)
        token_logp_BxK, _ = logprobs_and_entropy(model.logits(predictors_BxKxD), tokens_BxK)
        scores.append(jnp.sum(jnp.where(mask_BxK, token_logp_BxK, 0.0), axis=-1))
    return jnp.stack(scores, axis=-1)


class LlamaOptionScorer:
    """`OptionScorer` on a models.llama.Llama + Tokenizer: one jitted teacher-forced program per shape.

    Contexts are batched up to `batch_size` (batch rounded up to a power of two) and left-padded to
    a multiple of `length_multiple` tokens (options to a multiple of 16), so a run compiles a
    handful of shapes. Each context is run once whatever the number of options: they are scored
    from its KV cache.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, length_multiple: int = 64):
        if batch_size < 1 or length_multiple < 1:
            raise FeedbackError(f"option scorer: batch_size and length_multiple must be >= 1, got {batch_size}, {length_multiple}")
        self.config = model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.length_multiple = length_multiple
        self._graphdef, self._state = nnx.split(model)
        self._program = jax.jit(_option_logprobs, static_argnums=(0,))

    def update_weights(self, model) -> None:
        """Score with new weights of the same architecture (no recompile)."""
        self._graphdef, self._state = nnx.split(model)

    def render(self, chat: Chat) -> str:
        return self.tokenizer.render_chat(chat, add_generation_prompt=True)

    def score(self, contexts: Sequence[str], options: Sequence[str] | Sequence[Sequence[str]]) -> np.ndarray:
        per_context = per_context_options(contexts, options)
        encoded: dict[str, list[int]] = {}
        for text in {o for row in per_context for o in row}:
            encoded[text] = self.tokenizer.encode(text)
            if not encoded[text]:
                raise FeedbackError(f"option scorer: option {text!r} encodes to no tokens")
        context_ids = [self.tokenizer.encode(c, add_bos=self.tokenizer.add_bos_token) for c in contexts]
        if any(not ids for ids in context_ids):
            raise FeedbackError("option scorer: a context encodes to no tokens; a context must hold some text")
        longest = max((len(c) + max(len(encoded[o]) for o in row) for c, row in zip(context_ids, per_context)), default=0)
        if longest > self.config.max_position_embeddings:
            raise FeedbackError(
                f"option scorer: a context plus option has {longest} tokens, more than the model's "
                f"max_position_embeddings {self.config.max_position_embeddings}; use fewer few-shot examples or shorter answers"
            )
        scores = np.zeros((len(contexts), len(per_context[0]) if per_context else 0), np.float32)
        for start in range(0, len(contexts), self.batch_size):
            stop = start + self.batch_size
            rows = [[encoded[o] for o in row] for row in per_context[start:stop]]
            scores[start:stop] = self._score_chunk(context_ids[start:stop], rows)
        return scores

    def _score_chunk(self, chunk, option_rows) -> np.ndarray:
        batch = min(1 << (len(chunk) - 1).bit_length(), self.batch_size)  # few batch shapes: powers of two
        num_options = len(option_rows[0])
        option_slots = _round_up(max(len(ids) for row in option_rows for ids in row), 16)
        slots = _round_up(max(len(ids) for ids in chunk), self.length_multiple)
        slots = max(min(slots, self.config.max_position_embeddings - option_slots), max(len(ids) for ids in chunk))
        context_BxP = np.full((batch, slots), self.tokenizer.pad_id, np.int32)
        mask_BxP = np.zeros((batch, slots), np.bool_)
        mask_BxP[:, -1] = True  # batch-padding rows: one dummy token
        options_BxOxK = np.zeros((batch, num_options, option_slots), np.int32)
        options_mask_BxOxK = np.zeros((batch, num_options, option_slots), np.bool_)
        for row, (ids, option_ids) in enumerate(zip(chunk, option_rows)):
            context_BxP[row, slots - len(ids):] = ids
            mask_BxP[row, slots - len(ids):] = True
            for o, tokens in enumerate(option_ids):
                options_BxOxK[row, o, : len(tokens)] = tokens
                options_mask_BxOxK[row, o, : len(tokens)] = True
        out = self._program(self._graphdef, self._state, context_BxP, mask_BxP, options_BxOxK, options_mask_BxOxK)
        return np.asarray(out)[: len(chunk)]


def per_context_options(contexts: Sequence[str], options) -> list[list[str]]:
    """Options as one list per context: a list of strings is shared by every context."""
    if not options:
        raise FeedbackError("option scorer: give at least one option")
    if all(isinstance(o, str) for o in options):
        return [list(options)] * len(contexts)
    rows = [list(row) for row in options]
    if len(rows) != len(contexts):
        raise FeedbackError(f"option scorer: {len(rows)} option lists for {len(contexts)} contexts")
    if len({len(row) for row in rows}) > 1 or not rows[0]:
        raise FeedbackError("option scorer: every context needs the same, non-zero number of options")
    return rows


# -- labelling ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
    """How preference labels are made: the `label` section of a run config, and what a `label` task
    carries to a worker."""

    max_new_tokens: int = 48  # per sampled response
    temperature: float = 1.0  # the two responses of a pair are sampled at this temperature
    top_p: float = 0.95
    scoring: Literal["choice", "contrast"] = "choice"  # choice: "(A)"/"(B)" multiple choice (the paper); contrast: good vs bad instruction likelihood (small models)
    principles_per_pair: int = 1  # ensemble: comparison principles scored per pair, probabilities averaged
    few_shot: int = 1  # feedback examples shown before each question (choice scoring; 0 = none)
    debias_order: bool = True  # also ask with the answers swapped, average the two estimates (choice scoring)
    chain_of_thought: bool = False  # reason first, then score the options; probabilities clamped (choice scoring)
    cot_tokens: int = 96  # reasoning budget with chain_of_thought
    cot_clamp: tuple[float, float] | None = (0.4, 0.6)  # clamp range after chain-of-thought (the paper's 40–60%); null: none

    def __post_init__(self):
        if self.principles_per_pair < 1:
            raise FeedbackConfigError("principles_per_pair", f"principles_per_pair must be ≥ 1, got {self.principles_per_pair}")
        if self.max_new_tokens < 1 or self.cot_tokens < 1:
            raise FeedbackConfigError("max_new_tokens", "max_new_tokens and cot_tokens must be ≥ 1")
        if self.few_shot < 0:
            raise FeedbackConfigError("few_shot", f"few_shot must be ≥ 0, got {self.few_shot}")
        if self.scoring not in ("choice", "contrast"):
            raise FeedbackConfigError("scoring", f"scoring must be 'choice' or 'contrast', got {self.scoring!r}")
        if self.scoring == "contrast":
            # Contrast scoring asks no lettered question: nothing to show examples of, no order to swap.
            for key, value in (("chain_of_thought", self.chain_of_thought), ("few_shot", self.few_shot),
                               ("debias_order", self.debias_order)):
                if value:
                    raise FeedbackConfigError(key, f"{key} applies to scoring 'choice' only; with scoring 'contrast' "
                                                   f"set it to {0 if key == 'few_shot' else 'false'}")
        if self.cot_clamp is not None:
            low, high = self.cot_clamp
            if not 0.0 <= low <= 0.5 <= high <= 1.0 or low == high:
                raise FeedbackConfigError("cot_clamp", f"cot_clamp must be [low, high] with 0 ≤ low ≤ 0.5 ≤ high ≤ 1 "
                                                       f"and low < high, got {list(self.cot_clamp)}")


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


def feedback_principles(constitution: Constitution, scoring: str) -> list[Principle]:
    """The principles a scoring mode can use: comparison questions, or good/bad instruction pairs."""
    if scoring == "contrast":
        pool = [p for p in constitution.principles if p.for_contrast]
        if not pool:
            raise FeedbackError(
                f"feedback: scoring='contrast' needs principles with good_instruction and bad_instruction; "
                f"constitution {constitution.name!r} has none"
            )
        return pool
    return list(constitution.comparison_principles)


def sample_comparison_principles(constitution: Constitution, seed: int, uid: str, k: int,
                                 scoring: str = "choice") -> list[Principle]:
    """k distinct feedback principles for prompt `uid` (all of them if there are fewer than k)."""
    pool = feedback_principles(constitution, scoring)
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
    seed: int = 0,
) -> list[LabelRecord]:
    """Soft preference labels for `pairs`: one scorer call (and one generator call with CoT) for the whole
    batch. `seed` (the run's) draws each pair's principles."""
    if not pairs:
        return []
    if config.chain_of_thought and generator is None:
        raise FeedbackError("feedback: chain_of_thought needs a generator to write the reasoning")
    principles = [sample_comparison_principles(constitution, seed, p.uid, config.principles_per_pair, config.scoring)
                  for p in pairs]
    if config.scoring == "contrast":
        return _label_by_contrast(pairs, principles, constitution, scorer)
    few_shot = feedback_few_shot(constitution, config.few_shot, config.chain_of_thought)
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


def _label_by_contrast(pairs: Sequence[ResponsePair], principles: list[list[Principle]], constitution: Constitution,
                       scorer: OptionScorer) -> list[LabelRecord]:
    """Contrastive labels: per (pair, principle), both answers scored under the good and the bad instruction."""
    contexts, answer_rows = [], []
    for pair, chosen in zip(pairs, principles):
        conversation = prompt_messages(pair.prompt)
        for principle in chosen:
            for instruction in (principle.good_instruction, principle.bad_instruction):
                contexts.append(scorer.render(contrast_chat(conversation, instruction)))
                answer_rows.append([pair.response_a.strip(), pair.response_b.strip()])  # the reply opens the assistant turn
    logp_Mx2 = scorer.score(contexts, answer_rows)
    p_a_all = contrastive_probability(logp_Mx2[0::2], logp_Mx2[1::2])  # rows alternate good, bad
    records, offset = [], 0
    for pair, chosen in zip(pairs, principles):
        probs = p_a_all[offset : offset + len(chosen)]
        offset += len(chosen)
        records.append(LabelRecord(
            uid=pair.uid, prompt=pair.prompt, response_a=pair.response_a, response_b=pair.response_b,
            p_a=float(ensemble(probs)), principle_ids=tuple(p.id for p in chosen),
            per_principle_probs=tuple(float(p) for p in probs), constitution_hash=constitution.hash,
        ))
    return records
