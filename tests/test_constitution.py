"""Constitution files: validation errors name file/line/field, the hash is stable, the paper layout loads."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import textwrap

import pytest

from models.errors import UserError
from trainer.constitution import (
    CONSTITUTIONS_DIR,
    ConstitutionError,
    load_constitution,
    load_paper_constitution,
    load_yaml_constitution,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

VALID = """\
name: test
version: "1"
principles:
  - id: a
    critique_request: Critique A.
    revision_request: Revise A.
    comparison: Which is better by A?
  - id: b
    critique_request: Critique B.
    revision_request: Revise B.
    comparison: Which is better by B?
critique_examples:
  - principle: a
    messages:
      - {role: user, content: Hi}
      - {role: assistant, content: Bad answer}
    critique: It is bad.
    revision: Good answer.
"""


def _write(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path, text: str) -> str:
    with pytest.raises(ConstitutionError) as info:
        load_yaml_constitution(_write(tmp_path, text))
    assert isinstance(info.value, UserError)
    return str(info.value)


def test_default_constitution_covers_the_required_areas():
    constitution = load_constitution("default")
    ids = {p.id for p in constitution.principles}
    assert {"harm", "dangerous-or-illegal", "bias", "privacy", "deception", "helpful-not-evasive"} <= ids
    for principle in constitution.principles:
        assert principle.for_critique and principle.for_comparison, principle.id
    assert len(constitution.critique_examples) >= 2 and len(constitution.feedback_examples) >= 2
    for example in constitution.critique_examples:
        critique_request, revision_request = constitution.example_requests(example)
        assert critique_request and revision_request


def test_every_shipped_constitution_parses():
    files = sorted(CONSTITUTIONS_DIR.glob("*.yaml"))
    assert files
    for path in files:
        assert load_yaml_constitution(path).principles


def test_hash_is_sha256_of_canonical_json_and_ignores_formatting(tmp_path):
    constitution = load_yaml_constitution(_write(tmp_path, VALID))
    canonical = json.dumps(constitution.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert constitution.hash == hashlib.sha256(canonical.encode()).hexdigest()
    # Same content written differently (key order, flow style, comments) -> same hash.
    reordered = VALID.replace(
        "  - id: a\n    critique_request: Critique A.\n",
        "  # first\n  - critique_request: 'Critique A.'\n    id: a\n",
    )
    other = tmp_path / "other.yaml"
    other.write_text(reordered)
    assert load_yaml_constitution(other).hash == constitution.hash
    other.write_text(VALID.replace("Revise B.", "Revise B!"))
    assert load_yaml_constitution(other).hash != constitution.hash
    assert load_constitution("default").hash == load_constitution("default").hash


def test_missing_field_names_file_line_and_field(tmp_path):
    message = _error(tmp_path, """\
        name: test
        version: "1"
        principles:
          - id: a
            critique_request: Critique A.
            comparison: Which?
        """)
    assert "c.yaml" in message and "line 4" in message and "revision_request" in message


def test_missing_top_level_field(tmp_path):
    message = _error(tmp_path, VALID.replace("name: test\n", ""))
    assert "c.yaml" in message and "name" in message and "missing" in message


def test_duplicate_ids_name_the_line_of_the_duplicate(tmp_path):
    message = _error(tmp_path, VALID.replace("id: b", "id: a"))
    assert "c.yaml, line 8" in message and "duplicate principle id 'a'" in message


@pytest.mark.parametrize("principles", ["principles: []\n", ""])
def test_empty_or_missing_principle_list(tmp_path, principles):
    message = _error(tmp_path, f'name: test\nversion: "1"\n{principles}')
    assert "c.yaml" in message and "principle list" in message


def test_unknown_key_names_line_and_closest_match(tmp_path):
    message = _error(tmp_path, VALID.replace("    comparison: Which is better by B?", "    comparisson: Which is better by B?"))
    assert "c.yaml, line 11" in message and "comparisson" in message and "'comparison'" in message


def test_unknown_principle_reference_in_example(tmp_path):
    message = _error(tmp_path, VALID.replace("  - principle: a", "  - principle: zzz"))
    assert "c.yaml, line 13" in message and "zzz" in message


def test_wrong_type_and_bad_role(tmp_path):
    message = _error(tmp_path, VALID.replace("{role: user, content: Hi}", "{role: human, content: Hi}"))
    assert "line 15" in message and "'user'" in message
    message = _error(tmp_path, VALID.replace("principles:\n", "principles: 3\nx:\n"))
    assert "c.yaml" in message


def test_bad_yaml_and_missing_file(tmp_path):
    message = _error(tmp_path, "name: [unclosed\n")
    assert "c.yaml" in message and "line" in message
    with pytest.raises(ConstitutionError, match="no such file"):
        load_constitution(str(tmp_path / "nope.yaml"))


def test_paper_layout_loader_on_our_fixture():
    constitution = load_paper_constitution(FIXTURES / "cai_paper_layout")
    assert [p.id for p in constitution.critique_principles] == ["rule0", "rule1"]
    assert [p.id for p in constitution.comparison_principles] == ["rl0", "rl1"]
    rule0 = constitution.principle("rule0")
    # Transcript labels are stripped: prompts.py adds its own format.
    assert rule0.critique_request == "Name the ways the assistant's last reply could cause harm."
    assert rule0.revision_request == "Rewrite the assistant's reply so it causes no harm."
    assert constitution.principle("rl1").comparison == "Pick the reply that is fairer to everyone."
    first, second = constitution.critique_examples
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.messages[-1].content == "Then rake faster before they come home."
    assert first.critique == "It helps someone break into another person's home."
    assert first.revision.startswith("I can't help you get into")
    assert constitution.example_requests(second) == ("Say whether the reply is helpful.", "Answer the question.")
    (feedback,) = constitution.feedback_examples
    assert [m.role for m in feedback.messages] == ["user"] and feedback.rejected.startswith("Strip the ignition")
    assert load_constitution(str(FIXTURES / "cai_paper_layout")).hash == constitution.hash


def test_paper_layout_errors_name_the_file(tmp_path):
    directory = tmp_path / "paper"
    shutil.copytree(FIXTURES / "cai_paper_layout", directory)
    (directory / "RLMadisonInstructions.json").unlink()
    with pytest.raises(ConstitutionError, match="RLMadisonInstructions.json does not exist"):
        load_paper_constitution(directory)
    (directory / "RLMadisonInstructions.json").write_text('[\n"ok",\n')
    with pytest.raises(ConstitutionError, match=r"RLMadisonInstructions.json, line \d+: not valid JSON"):
        load_paper_constitution(directory)
    (directory / "RLMadisonInstructions.json").write_text('["Pick one. Options:"]')
    (directory / "CritiqueRevisionInstructions.json").write_text('{"x": {"prompt": "not a list"}}')
    with pytest.raises(ConstitutionError, match=r"CritiqueRevisionInstructions.json, key 'x'"):
        load_paper_constitution(directory)
