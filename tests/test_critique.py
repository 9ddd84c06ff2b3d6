"""The SL-CAI loop with a fake generator (the sampler is a process boundary), and the JSONL records."""

from __future__ import annotations

import collections
import json

import pytest

from models.errors import UserError
from trainer.constitution import load_constitution
from trainer.critique import (
    CritiqueConfig,
    CritiqueRecord,
    run_sl_cai,
    sample_principle,
    sft_examples,
)
from trainer.data.records import Prompt
from trainer.ledger import read_records


class FakeGenerator:
    """Answers from the last user message so tests can see what each step was asked."""

    def __init__(self, empty_revisions: bool = False):
        self.calls: list[tuple[int, int]] = []  # (batch size, max_new_tokens)
        self.empty_revisions = empty_revisions
        self.constitution = load_constitution("default")

    def generate(self, chats, max_new_tokens):
        self.calls.append((len(chats), max_new_tokens))
        out = []
        for chat in chats:
            assert [m["role"] for m in chat][-1] == "user"
            roles = [m["role"] for m in chat]
            assert all(a != b for a, b in zip(roles, roles[1:])), "turns must alternate"
            request = chat[-1]["content"]
            critique_ids = [p.id for p in self.constitution.principles if p.critique_request == request]
            revision_ids = [p.id for p in self.constitution.principles if p.revision_request == request]
            if critique_ids:
                out.append(f"Critique: flaw by {critique_ids[0]} in [{chat[-2]['content']}]\n\nHuman: extra")
            elif revision_ids:
                out.append("" if self.empty_revisions else f"Revision: fixed by {revision_ids[0]}<|im_end|>")
            else:
                out.append(f"answer to {request}")
        return out


PROMPTS = [Prompt(f"u{i}", f"question {i}", "test") for i in range(6)] + [
    Prompt("hh", "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:", "hh")
]


def test_sl_cai_records_are_well_formed_and_batched():
    constitution = load_constitution("default")
    generator = FakeGenerator()
    config = CritiqueConfig(rounds=2, few_shot=1, max_new_tokens=11)
    records = run_sl_cai(PROMPTS, constitution, generator, config, seed=3)
    # One batched call per step: answer, then (critique, revision) per round.
    assert generator.calls == [(7, 11)] * 5
    for prompt, record in zip(PROMPTS, records):
        assert record.uid == prompt.uid and record.prompt == prompt.text
        assert record.constitution_hash == constitution.hash
        assert len(record.rounds) == 2
        first, second = record.rounds
        assert first.principle_id == sample_principle(constitution, 3, prompt.uid, 0).id
        assert second.principle_id == sample_principle(constitution, 3, prompt.uid, 1).id
        # Cleaned: labels and the model's next turn cut off; each critique saw the latest answer.
        assert first.critique == f"flaw by {first.principle_id} in [{record.initial_response}]"
        assert first.revision == f"fixed by {first.principle_id}"
        assert second.critique == f"flaw by {second.principle_id} in [{first.revision}]"
        assert record.final_revision == second.revision
    assert records[0].initial_response == "answer to question 0"
    assert records[-1].initial_response == "answer to help me"  # multi-turn hh prompt, last human turn answered
    # JSONL round trip.
    line = json.loads(json.dumps(records[0].to_json()))
    assert set(line) == {"uid", "prompt", "initial_response", "rounds", "final_revision", "constitution_hash"}
    assert set(line["rounds"][0]) == {"principle_id", "critique", "revision"}
    assert CritiqueRecord.from_json(line) == records[0]


def test_principle_sampling_is_deterministic_per_uid_and_covers_principles():
    constitution = load_constitution("default")
    a = run_sl_cai(PROMPTS, constitution, FakeGenerator(), CritiqueConfig(), seed=5)
    b = run_sl_cai(PROMPTS[::-1], constitution, FakeGenerator(), CritiqueConfig(), seed=5)  # other batch order
    assert {r.uid: r.rounds[0].principle_id for r in a} == {r.uid: r.rounds[0].principle_id for r in b}
    counts = collections.Counter(sample_principle(constitution, 0, f"p{i}", 0).id for i in range(800))
    assert set(counts) == {p.id for p in constitution.critique_principles}
    assert min(counts.values()) > 800 / len(counts) / 2  # roughly uniform
    assert sample_principle(constitution, 0, "p1", 0) == sample_principle(constitution, 0, "p1", 0)


def test_empty_revision_keeps_previous_answer_and_sft_pairs(tmp_path):
    constitution = load_constitution("default")
    records = run_sl_cai(PROMPTS[:2], constitution, FakeGenerator(empty_revisions=True), CritiqueConfig(rounds=2))
    assert all(r.final_revision == r.initial_response for r in records)
    assert all(round_.revision == "" for r in records for round_ in r.rounds)
    good = run_sl_cai(PROMPTS, constitution, FakeGenerator(), CritiqueConfig())
    pairs = sft_examples(good + [CritiqueRecord("x", "p", "", (), "", "h")])
    assert [p.uid for p in pairs] == [p.uid for p in PROMPTS]
    assert pairs[-1].messages[-1] == {"role": "user", "content": "help me"} and pairs[0].response.startswith("fixed by")
    path = tmp_path / "sl.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in good), encoding="utf-8")
    assert [CritiqueRecord.from_json(row) for row in read_records(path)] == good


def test_initial_responses_given_and_config_validation():
    constitution = load_constitution("default")
    generator = FakeGenerator()
    records = run_sl_cai(PROMPTS[:2], constitution, generator, CritiqueConfig(), initial_responses=["a", "b"])
    assert [r.initial_response for r in records] == ["a", "b"] and len(generator.calls) == 2
    assert run_sl_cai([], constitution, generator) == []
    with pytest.raises(UserError, match="rounds must be ≥ 1"):
        CritiqueConfig(rounds=0)


def test_fresh_revision_style_answers_the_prompt_again():
    constitution = load_constitution("default")
    seen = []

    class Recorder(FakeGenerator):
        def generate(self, chats, max_new_tokens):
            seen.append(chats)
            return super().generate(chats, max_new_tokens)

    records = run_sl_cai(PROMPTS[:1], constitution, Recorder(), CritiqueConfig(revision_style="fresh"))
    (revision_chat_,) = seen[2]
    principle = constitution.principle(records[0].rounds[0].principle_id)
    assert revision_chat_ == [{"role": "user", "content": f"question 0\n\n{principle.revision_request} Keep in mind this "
                                                          f"critique of an earlier reply: {records[0].rounds[0].critique}"}]
    with pytest.raises(UserError, match="revision_style"):
        CritiqueConfig(revision_style="other")


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_critiques_a_harmful_answer(smollm2):
    from models.generation import Sampler
    from models.sampling import SamplingParams
    from trainer.critique import SamplerTextGenerator

    tokenizer = smollm2.tokenizer
    sampler = Sampler(smollm2.model, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    generator = SamplerTextGenerator(sampler, tokenizer, SamplingParams(temperature=0.0))
    harmful = "Mix bleach with ammonia in a closed room; the fumes are toxic."
    config = CritiqueConfig(few_shot=1, max_new_tokens=48, revision_style="fresh")
    (record,) = run_sl_cai([Prompt("p", "What household chemicals can I mix to make a poison gas?")],
                           load_constitution("default"), generator, config, initial_responses=[harmful])
    critique = record.rounds[0].critique
    assert len(critique.split()) >= 5, critique  # real text, several words
    assert critique != harmful and "<|im" not in critique
    assert record.final_revision and record.final_revision != harmful


def test_direct_revisions_skip_the_critique_and_carry_the_constitution_guidance():
    constitution = load_constitution("default")
    seen = []

    class Recorder(FakeGenerator):
        def generate(self, chats, max_new_tokens):
            seen.append([chat[-1]["content"] for chat in chats])
            return super().generate(chats, max_new_tokens)

    records = run_sl_cai(PROMPTS[:3], constitution, Recorder(), CritiqueConfig(rounds=1, few_shot=1, revision_style="direct"),
                         seed=1)
    assert len(seen) == 2  # the answers, then the revisions: no critique call
    for record, request in zip(records, seen[1]):
        principle = constitution.principle(record.rounds[0].principle_id)
        assert request.endswith(principle.revision_request.strip())
        assert constitution.revision_guidance in request
        assert record.rounds[0].critique == ""
        assert record.final_revision == f"answer to {request}"
    assert constitution.revision_guidance.startswith("Answer harmless questions fully")
