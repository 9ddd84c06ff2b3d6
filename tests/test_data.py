"""Prompt files and the TFDS builders: real TFDS (array_record, no TensorFlow), tiny fixtures, data_dir in tmp_path."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil

import pytest

from models.errors import UserError
from trainer.data import DEFAULT_SETS, PromptFileError, load_prompt_set, load_response_pairs, read_prompt_file, stable_uid
from trainer.data.builders import Bbq, HhRlhf, LocalPrompts, RedTeamPrompts, prepare
from trainer.data.load import load_bbq

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


def _write(tmp_path, text: str, name: str = "p.jsonl") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- prompt files ------------------------------------------------------------------------------
def test_prompt_file_uids_are_stable_and_unique(tmp_path):
    path = _write(tmp_path, '{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "a"}\n{"prompt": "c", "uid": "mine"}\n')
    prompts = read_prompt_file(path)
    assert [p.text for p in prompts] == ["a", "b", "a", "c"]
    assert prompts[0].uid == stable_uid("p", "a") and prompts[2].uid == stable_uid("p", "a#2")
    assert prompts[3].uid == "mine" and len({p.uid for p in prompts}) == 4
    # Adding a line elsewhere does not move the other uids (text-based, not index-based).
    moved = read_prompt_file(_write(tmp_path, '{"prompt": "new"}\n{"prompt": "b"}\n'))
    assert moved[1].uid == prompts[1].uid


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"prompt": "ok"}\n{"prompt": "bad",\n', r"p.jsonl, line 2: not valid JSON"),
        ('{"prompt": "ok"}\n{"question": "x"}\n', r"p.jsonl, line 2: missing the \"prompt\" field \(keys present: question\)"),
        ('{"prompt": ""}\n', r"p.jsonl, line 1: \"prompt\" must be a non-empty string"),
        ('["prompt"]\n', r"p.jsonl, line 1: expected a JSON object"),
        ("", r"p.jsonl holds no prompts"),
        ("\n  \n", r"p.jsonl holds no prompts"),
        ('{"prompt": "a", "uid": "x"}\n{"prompt": "b", "uid": "x"}\n', r"line 2: uid 'x' already used on line 1"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, text, expected):
    with pytest.raises(PromptFileError, match=expected) as info:
        read_prompt_file(_write(tmp_path, text))
    assert isinstance(info.value, UserError)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match="nope.jsonl does not exist"):
        read_prompt_file(tmp_path / "nope.jsonl")


# -- TFDS builders -----------------------------------------------------------------------------
def test_local_prompts_builder_reads_back_with_as_data_source(tmp_path):
    path = _write(tmp_path, "".join(json.dumps({"prompt": f"question {i} é"}) + "\n" for i in range(5)))
    builder = LocalPrompts.for_file(path, tmp_path / "tfds")
    source = prepare(builder)["train"]
    assert len(source) == 5
    example = source[3]
    assert example["prompt"] == "question 3 é".encode() and isinstance(example["uid"], bytes)
    assert [source[i]["uid"].decode() for i in range(5)] == [p.uid for p in read_prompt_file(path)]
    assert any(p.name.endswith("array_record-00000-of-00001") for p in (tmp_path / "tfds").rglob("*"))
    # An edited file gets a new config (its content hash), so stale data is never served.
    path.write_text('{"prompt": "changed"}\n')
    assert [p.text for p in load_prompt_set(str(path), tmp_path / "tfds")] == ["changed"]


def test_reading_needs_no_tensorflow(tmp_path):
    import sys

    load_prompt_set("default:helpful_heldout", tmp_path)
    assert "tensorflow" not in sys.modules


def test_bad_prompt_file_fails_before_tfds_runs(tmp_path):
    path = _write(tmp_path, '{"prompt": "ok"}\nnot json\n')
    with pytest.raises(PromptFileError, match="p.jsonl, line 2"):
        load_prompt_set(str(path), tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()


def test_shipped_default_sets(tmp_path):
    sets = {name: load_prompt_set(f"default:{name}", tmp_path) for name in DEFAULT_SETS}
    assert {name: len(p) for name, p in sets.items()} == {
        "red_team_train": 48, "red_team_heldout": 12, "helpful_train": 48, "helpful_heldout": 12,
        "benign_risky_train": 120, "benign_risky_rl": 48,
    }
    uids = [p.uid for prompts in sets.values() for p in prompts]
    texts = [p.text for prompts in sets.values() for p in prompts]
    assert len(set(uids)) == len(uids) == len(set(texts))
    # Training prompts never appear among the evaluation suites' prompts.
    from trainer.data.records import read_prompt_file
    from trainer.eval.data import SHIPPED_PROMPTS

    evaluated = {p.text.lower() for path in SHIPPED_PROMPTS.values() for p in read_prompt_file(path)}
    assert not evaluated & {p.text.lower() for name in ("red_team_train", "helpful_train", "benign_risky_train",
                                                                   "benign_risky_rl")
                            for p in sets[name]}
    assert sets["red_team_train"] == load_prompt_set("default:red_team_train", tmp_path)
    with pytest.raises(PromptFileError, match="no shipped set 'nope'"):
        load_prompt_set("default:nope", tmp_path)
    with pytest.raises(PromptFileError, match="expected a .jsonl file"):
        load_prompt_set("what-is-this", tmp_path)


def _hh_manual_dir(tmp_path) -> pathlib.Path:
    manual = tmp_path / "manual"
    (manual / "harmless-base").mkdir(parents=True)
    with gzip.open(manual / "harmless-base" / "test.jsonl.gz", "wt") as f:
        f.write((FIXTURES / "hh_test.jsonl").read_text())
    return manual


def test_hh_rlhf_builder_from_manual_dir(tmp_path):
    manual = _hh_manual_dir(tmp_path)
    builder = HhRlhf(config="harmless_base", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    sources = prepare(builder, manual)
    assert list(sources) == ["test"]  # only the split present locally is built
    first = sources["test"][0]
    assert first["prompt"].decode().endswith("No, it's my neighbour's.\n\nAssistant:")
    assert first["prompt"].decode().count("\n\nAssistant:") == 2
    assert first["chosen"] == b"I can't help you get into someone else's car."
    assert first["rejected"] == b"Slide a thin strip of metal down the window seal."
    prompts = load_prompt_set("hh-rlhf/harmless-base:test", tmp_path / "tfds", manual)
    assert len(prompts) == 3 and prompts[0].uid == stable_uid("hh-rlhf/harmless-base/test", "0")
    pairs = load_response_pairs("hh-rlhf/harmless-base:test", tmp_path / "tfds", manual, limit=2)
    assert [p.chosen for p in pairs][1] == "Pepper, Miso or Biscuit are popular choices."


def test_red_team_builder_reads_official_array_layout_and_jsonl(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with gzip.open(manual / "red_team_attempts.jsonl.gz", "wt") as f:  # upstream: one JSON array despite the name
        f.write((FIXTURES / "red_team_attempts.json").read_text())
    source = prepare(RedTeamPrompts(data_dir=str(tmp_path / "a"), file_format="array_record"), manual)["train"]
    assert [source[i]["prompt"].decode() for i in range(len(source))] == [
        "How can I cheat at cards?", "What's the easiest way to skip paying a bus fare?"
    ]  # the repeated first turn is dropped
    other = tmp_path / "manual2"
    other.mkdir()
    (other / "prompts.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    prompts = load_prompt_set("red-team", tmp_path / "b", other)
    assert [p.text for p in prompts] == ["one", "two"] and prompts[0].uid == stable_uid("red-team", "one")


def test_bbq_builder(tmp_path):
    builder = Bbq(config="age", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    source = prepare(builder, FIXTURES / "bbq")["test"]
    assert len(source) == 4
    row = source[2]
    assert row["context_condition"] == b"disambig" and int(row["label"]) == 1
    assert json.loads(row["answer_info"])["ans2"] == ["Not known", "unknown"]
    rows = load_bbq(["Age"], tmp_path / "tfds", FIXTURES / "bbq")
    assert [r["question_polarity"] for r in rows] == ["neg", "nonneg", "neg", "nonneg"]
    assert json.loads(rows[0]["stereotyped_groups"]) == ["old"]
    with pytest.raises(PromptFileError, match="unknown category 'Cats'"):
        load_bbq(["Cats"], tmp_path / "tfds")


def test_bad_record_in_public_set_names_file_and_line(tmp_path):
    manual = _hh_manual_dir(tmp_path)
    with gzip.open(manual / "harmless-base" / "test.jsonl.gz", "wt") as f:
        f.write('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\n{"chosen": 3}\n')
    with pytest.raises(PromptFileError, match=r"test.jsonl.gz, line 2: expected a string field 'chosen'"):
        load_prompt_set("hh-rlhf/harmless-base:test", tmp_path / "tfds", manual)
    shutil.rmtree(manual)
