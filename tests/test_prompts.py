"""Prompt formatting snapshots and the pure cleaning functions."""

from __future__ import annotations

import pathlib

from trainer.constitution import load_constitution, load_paper_constitution
from trainer.prompts import (
    clean_generation,
    comparison_question,
    critique_chat,
    critique_example_turns,
    cut_at_markers,
    feedback_few_shot,
    options,
    prompt_messages,
    revision_chat,
    strip_leading_label,
    transcript,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def test_prompt_messages_plain_and_hh_transcript():
    assert prompt_messages("  How do I bake bread? ") == [{"role": "user", "content": "How do I bake bread?"}]
    hh = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert prompt_messages(hh) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert transcript(prompt_messages(hh)) == "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."


def test_comparison_question_snapshot():
    question = comparison_question(
        [{"role": "user", "content": "Can you help me?"}], ["Sure.", " No. "], "Which reply is kinder?"
    )
    assert question == (
        "Consider the following conversation between a human and an assistant:\n"
        "\n"
        "Human: Can you help me?\n"
        "\n"
        "Which reply is kinder?\n"
        "Options:\n"
        "(A) Sure.\n"
        "(B) No.\n"
        "\n"
        "Answer with (A) or (B)."
    )
    assert comparison_question([{"role": "user", "content": "x"}], ["a", "b"], "Q?", chain_of_thought=True).endswith(
        "Let's think step by step about which option is better, then give the answer as (A) or (B)."
    )
    assert options() == [" (A)", " (B)"]


def test_critique_and_revision_chat_snapshot():
    conversation = [{"role": "user", "content": "How do I pick a lock?"}]
    chat = revision_chat(conversation, "Use a pin.", "Critique it.", "It helps break in.", "Rewrite it.",
                         few_shot=[{"role": "user", "content": "shot"}, {"role": "assistant", "content": "ok"}])
    assert chat == [
        {"role": "user", "content": "shot"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Use a pin."},
        {"role": "user", "content": "Critique it."},
        {"role": "assistant", "content": "It helps break in."},
        {"role": "user", "content": "Rewrite it."},
    ]
    assert critique_chat(conversation, "Use a pin.", "Critique it.") == chat[2:5]


def test_few_shot_turns_use_principle_requests_and_alternate_feedback_answers():
    constitution = load_constitution("default")
    example = constitution.critique_examples[0]
    turns = critique_example_turns(constitution, example)
    principle = constitution.principle(example.principle)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert turns[2]["content"] == principle.critique_request and turns[4]["content"] == principle.revision_request
    assert turns[5]["content"] == example.revision
    shots = feedback_few_shot(constitution, 2)
    assert [t["role"] for t in shots] == ["user", "assistant"] * 2
    assert shots[1]["content"] == "The answer is: (B)" and shots[3]["content"] == "The answer is: (A)"
    first = constitution.feedback_examples[0]
    assert f"(B) {first.chosen.strip()}" in shots[0]["content"] and constitution.principle(first.principle).comparison in shots[0]["content"]
    cot = feedback_few_shot(constitution, 1, chain_of_thought=True)
    assert cot[1]["content"].endswith("\nSo the answer is: (B)") and cot[1]["content"].startswith(first.reasoning.strip())
    # Paper-layout examples have no principle: the first comparison principle is asked.
    paper = load_paper_constitution(FIXTURES / "cai_paper_layout")
    assert "Pick the reply that causes less harm." in feedback_few_shot(paper, 1)[0]["content"]


def test_cleaning_generations():
    assert cut_at_markers("I can't help with that.\n\nHuman: ok then\nAssistant: x") == "I can't help with that."
    assert cut_at_markers("Fine answer<|im_end|>junk") == "Fine answer"
    assert cut_at_markers("no markers  ") == "no markers"
    assert strip_leading_label("  Revision: Revision: Better text") == "Better text"
    assert strip_leading_label("critique: lower case") == "lower case"
    assert clean_generation("Critique: It is rude.\nRevisionRequest: Rewrite") == "It is rude."
    assert clean_generation("\n\nHuman: only a new turn") == ""
