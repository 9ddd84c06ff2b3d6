"""SL-CAI: answer, then R rounds of (sample a principle, critique, revise); final revisions become SFT data.

    generator = SamplerTextGenerator(sampler, tokenizer, SamplingParams(temperature=0.7, top_p=0.9))
    records = run_sl_cai(prompts, constitution, generator, CritiqueConfig(rounds=2), seed=0)
    pairs = sft_examples(records)

Every step is one batched call of the generator over all prompts. The principle of round r for a
prompt is drawn from an RNG seeded by (seed, uid, r) alone, so a prompt re-dispatched to another
worker, or run again after a resume, gets the same principles whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

from trainer.configlib import FieldError
from trainer.constitution import Constitution, CritiqueExample, Principle
from trainer.data.records import Prompt
from trainer.prompts import (
    Chat,
    clean_generation,
    critique_chat,
    critique_example_turns,
    direct_revision_chat,
    fresh_revision_chat,
    prompt_messages,
    revision_chat,
)


class TextGenerator(Protocol):
    """Anything that continues chats: one reply per chat, at most `max_new_tokens` tokens each."""

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class CritiqueConfig:
    """How SL-CAI samples and how long each generated piece may be: the `sl` section of a run config
    (trainer.config.SLSection adds the fine-tuning settings) and what an `sl` task carries to a worker."""

    rounds: int = 1  # critique → revision rounds per prompt
    few_shot: int = 1  # few-shot critique examples in each prompt (0 = none)
    # chat: revise after the critique (the paper); fresh: answer anew guided by it (small models);
    # direct: answer anew guided by the constitution and the principle, no critique (the paper's §3.5 ablation)
    revision_style: Literal["chat", "fresh", "direct"] = "chat"
    max_new_tokens: int = 64  # budget of the answer, of each critique and of each revision
    temperature: float = 0.0  # 0 = greedy

    def __post_init__(self):
        if self.rounds < 1:
            raise FieldError("rounds", f"rounds must be ≥ 1, got {self.rounds}")
        if self.revision_style not in ("chat", "fresh", "direct"):
            raise FieldError("revision_style",
                             f"revision_style must be 'chat', 'fresh' or 'direct', got {self.revision_style!r}")
        if self.few_shot < 0:
            raise FieldError("few_shot", f"few_shot must be ≥ 0, got {self.few_shot}")
        if self.max_new_tokens < 1:
            raise FieldError("max_new_tokens", f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise FieldError("temperature", f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class CritiqueRound:
    principle_id: str
    critique: str
    revision: str


@dataclasses.dataclass(frozen=True)
class CritiqueRecord:
    """One prompt's way through SL-CAI; `to_json()` is one line of samples/sl.jsonl."""

    uid: str
    prompt: str
    initial_response: str
    rounds: tuple[CritiqueRound, ...]
    final_revision: str  # the last non-empty revision (the initial answer if every revision came back empty)
    constitution_hash: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"rounds": [dataclasses.asdict(r) for r in self.rounds]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CritiqueRecord":
        return cls(**{**data, "rounds": tuple(CritiqueRound(**r) for r in data["rounds"])})


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A supervised pair: the prompt (as chat messages) and the revised answer to train on."""

    uid: str
    messages: tuple[dict[str, str], ...]
    response: str

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "messages": list(self.messages), "response": self.response}


def seeded_rng(seed: int, uid: str, purpose: str) -> random.Random:
    """An RNG that depends only on (seed, uid, purpose), via sha256 (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"{seed}\0{uid}\0{purpose}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_principle(constitution: Constitution, seed: int, uid: str, round_index: int) -> Principle:
    """The critique principle of round `round_index` for prompt `uid` (uniform over critique principles)."""
    return seeded_rng(seed, uid, f"principle/{round_index}").choice(constitution.critique_principles)


def sample_few_shot(constitution: Constitution, seed: int, uid: str, count: int) -> list[CritiqueExample]:
    """`count` distinct critique examples for prompt `uid` (all of them if there are fewer)."""
    examples = list(constitution.critique_examples)
    if count >= len(examples):
        return examples
    return seeded_rng(seed, uid, "few-shot").sample(examples, count)


def run_sl_cai(
    prompts: Sequence[Prompt],
    constitution: Constitution,
    generator: TextGenerator,
    config: CritiqueConfig = CritiqueConfig(),
    initial_responses: Sequence[str] | None = None,
    seed: int = 0,
) -> list[CritiqueRecord]:
    """Critique and revise an answer to each prompt; one generator call per step for the whole batch.

    `initial_responses` skips the answering step (e.g. answers sampled elsewhere). `seed` (the run's)
    draws the principles and few-shot examples.
    """
    if not prompts:
        return []
    conversations = [prompt_messages(p.text) for p in prompts]
    if initial_responses is None:
        raw = generator.generate([list(c) for c in conversations], config.max_new_tokens)
        initial_responses = [clean_generation(text) for text in raw]
    elif len(initial_responses) != len(prompts):
        raise ValueError(f"run_sl_cai: {len(initial_responses)} initial responses for {len(prompts)} prompts")
    few_shot: list[Chat] = []
    for prompt in prompts:
        turns: Chat = []
        for example in sample_few_shot(constitution, seed, prompt.uid, config.few_shot):
            turns += critique_example_turns(constitution, example)
        few_shot.append(turns)

    current = list(initial_responses)
    rounds: list[list[CritiqueRound]] = [[] for _ in prompts]
    for round_index in range(config.rounds):
        principles = [sample_principle(constitution, seed, p.uid, round_index) for p in prompts]
        if config.revision_style == "direct":
            critiques = [""] * len(prompts)  # a direct revision is guided by the constitution alone
        else:
            critique_chats = [
                critique_chat(conv, answer, principle.critique_request, shots)
                for conv, answer, principle, shots in zip(conversations, current, principles, few_shot)
            ]
            critiques = [clean_generation(t) for t in generator.generate(critique_chats, config.max_new_tokens)]
        revision_chats = [
            _revision_chat(config.revision_style, constitution, conv, answer, principle, critique, shots)
            for conv, answer, principle, critique, shots in zip(conversations, current, principles, critiques, few_shot)
        ]
        revisions = [clean_generation(t) for t in generator.generate(revision_chats, config.max_new_tokens)]
        for i, (principle, critique, revision) in enumerate(zip(principles, critiques, revisions)):
            rounds[i].append(CritiqueRound(principle.id, critique, revision))
            if revision:  # an empty revision revises nothing: keep critiquing the last real answer
                current[i] = revision

    return [
        CritiqueRecord(
            uid=prompt.uid,
            prompt=prompt.text,
            initial_response=initial,
            rounds=tuple(prompt_rounds),
            final_revision=final,
            constitution_hash=constitution.hash,
        )
        for prompt, initial, prompt_rounds, final in zip(prompts, initial_responses, rounds, current)
    ]


def _revision_chat(style: str, constitution: Constitution, conversation: Chat, answer: str, principle: Principle,
                   critique: str, few_shot: Chat) -> Chat:
    if style == "direct":
        return direct_revision_chat(conversation, constitution.revision_guidance, principle.revision_request)
    if style == "fresh":
        return fresh_revision_chat(conversation, critique, principle.revision_request)
    return revision_chat(conversation, answer, principle.critique_request, critique, principle.revision_request, few_shot)


def sft_examples(records: Iterable[CritiqueRecord]) -> list[SFTExample]:
    """(prompt, final revision) pairs for supervised fine-tuning; records with an empty final answer are skipped."""
    return [
        SFTExample(uid=r.uid, messages=tuple(prompt_messages(r.prompt)), response=r.final_revision)
        for r in records
        if r.final_revision.strip()
    ]


# -- the adapter over the sampler -------------------------------------------------------------------
class SamplerTextGenerator:
    """`TextGenerator` over a models.generation.Sampler: chat template -> token ids -> sample -> decoded text.

    Each call uses a fresh seed (base seed + call index), so repeated steps do not repeat the same
    random draws, while a whole run stays reproducible.
    """

    def __init__(self, sampler, tokenizer, params, seed: int = 0):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.params = params  # models.sampling.SamplingParams; max_new_tokens is set per call
        self.seed = seed
        self.calls = 0

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        if not chats:
            return []
        prompt_ids = [self.tokenizer.encode_chat(chat, add_generation_prompt=True) for chat in chats]
        params = dataclasses.replace(self.params, max_new_tokens=max_new_tokens)
        samples = self.sampler.generate(prompt_ids, params, seed=self.seed + self.calls)
        self.calls += 1
        return [
            self.tokenizer.decode(samples.tokens[row, : int(samples.lengths[row])].tolist(), skip_special_tokens=True)
            for row in range(len(chats))
        ]
