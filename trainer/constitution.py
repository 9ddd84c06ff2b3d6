"""Constitutions: the principles the model critiques, revises and judges against.

A constitution is a YAML file (configs/constitutions/default.yaml is the one we ship):

    name: cairl-default
    version: "1"
    principles:                       # at least one; ids unique
      - id: harm
        critique_request: ...         # SL-CAI: how to critique the last answer
        revision_request: ...         # SL-CAI: how to rewrite it
        comparison: ...               # RL-CAI: the multiple-choice question for pairwise feedback
    critique_examples: [...]          # few-shot conversations with a critique and a revision
    feedback_examples: [...]          # few-shot comparisons with the preferred answer

A principle may carry only the critique/revision pair or only the comparison (the CAI paper's
published files keep the two lists separate); `critique_principles` and `comparison_principles`
give the ones each stage samples from.

`load_paper_constitution(directory)` reads the JSON layout of the CAI paper's published files
(CritiqueRevisionInstructions.json, CritiqueRevisionFewShotPrompts.json, RLMadisonInstructions.json,
RLMadisonFewShotPrompts.json). `Constitution.hash` is a sha256 of a canonical JSON of the parsed
constitution: it is recorded in every run and on every sample, so data made under one constitution
is never silently mixed with another's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from models.errors import UserError
from trainer import configlib

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTIONS_DIR = ROOT / "configs" / "constitutions"

PAPER_FILES = {
    "critique": "CritiqueRevisionInstructions.json",
    "critique_examples": "CritiqueRevisionFewShotPrompts.json",
    "comparison": "RLMadisonInstructions.json",
    "feedback_examples": "RLMadisonFewShotPrompts.json",
}


class ConstitutionError(UserError, ValueError):
    """A constitution file (or directory in the paper's layout) that does not describe a valid constitution."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]  # who speaks
    content: str  # what they say

    def __post_init__(self):
        if not self.content.strip():
            raise ValueError(f"a {self.role} message has empty content")


@dataclasses.dataclass(frozen=True)
class Principle:
    """One rule of the constitution, phrased for each stage that uses it."""

    id: str  # short unique name, recorded on every sample it produced
    critique_request: str = ""  # asks the model to critique its last answer against the rule
    revision_request: str = ""  # asks the model to rewrite that answer to follow the rule
    comparison: str = ""  # asks which of two answers follows the rule better (pairwise feedback)
    good_instruction: str = ""  # contrastive feedback: asks for a reply that follows the rule
    bad_instruction: str = ""  # contrastive feedback: asks for a reply that breaks it

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.id):
            raise ValueError(f"principle id {self.id!r} must be letters, digits, '_', '-' or '.'")
        if bool(self.good_instruction.strip()) != bool(self.bad_instruction.strip()):
            missing = "bad_instruction" if self.good_instruction.strip() else "good_instruction"
            raise ValueError(f"principle {self.id!r} has only one of good_instruction / bad_instruction; missing field '{missing}'")
        if bool(self.critique_request.strip()) != bool(self.revision_request.strip()):
            missing = "revision_request" if self.critique_request.strip() else "critique_request"
            raise ValueError(
                f"principle {self.id!r} has only one of critique_request / revision_request; "
                f"missing field '{missing}' (the two are used together)"
            )
        if not (self.critique_request.strip() or self.comparison.strip()):
            raise ValueError(
                f"principle {self.id!r} is missing fields: give critique_request and revision_request "
                f"(for critique and revision) and/or comparison (for pairwise feedback)"
            )

    @property
    def for_critique(self) -> bool:
        return bool(self.critique_request.strip())

    @property
    def for_comparison(self) -> bool:
        return bool(self.comparison.strip())

    @property
    def for_contrast(self) -> bool:
        return bool(self.good_instruction.strip())


@dataclasses.dataclass(frozen=True)
class CritiqueExample:
    """A few-shot demonstration of one critique -> revision round.

    `messages` is the conversation up to and including the assistant answer that gets critiqued.
    The requests come from the named `principle`, or are written out in full.
    """

    messages: tuple[Message, ...]  # the conversation; the last message is the critiqued assistant answer
    critique: str  # the demonstrated critique
    revision: str  # the demonstrated rewrite
    principle: str = ""  # id of the principle whose requests are used
    critique_request: str = ""  # or: the critique request in full
    revision_request: str = ""  # and the revision request in full

    def __post_init__(self):
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("messages must end with the assistant answer that the example critiques")
        if not self.critique.strip() or not self.revision.strip():
            raise ValueError("critique and revision must be non-empty text")
        if not self.principle and not (self.critique_request.strip() and self.revision_request.strip()):
            raise ValueError("name a 'principle' or give both 'critique_request' and 'revision_request'")


@dataclasses.dataclass(frozen=True)
class FeedbackExample:
    """A few-shot demonstration of a pairwise judgement: which answer follows the principle better."""

    messages: tuple[Message, ...]  # the conversation before the two candidate answers; ends with a user turn
    chosen: str  # the better answer
    rejected: str  # the worse answer
    principle: str = ""  # id of the principle whose comparison is asked; default: the first comparison principle
    reasoning: str = ""  # optional step-by-step reasoning, shown when chain-of-thought feedback is on

    def __post_init__(self):
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("messages must end with the user turn that the two answers reply to")
        if not self.chosen.strip() or not self.rejected.strip():
            raise ValueError("chosen and rejected must be non-empty text")


@dataclasses.dataclass(frozen=True)
class Constitution:
    """A named, versioned set of principles plus few-shot examples."""

    name: str  # e.g. "cairl-default"
    version: str  # bump when the wording changes; the hash changes anyway
    principles: tuple[Principle, ...]  # the rules, at least one
    description: str = ""  # free text for humans
    # One instruction that sums the constitution up for the model answering: the guidance of direct
    # revisions (sl.revision_style: direct). Empty = `description`.
    guidance: str = ""
    critique_examples: tuple[CritiqueExample, ...] = ()  # few-shot critique/revision demonstrations
    feedback_examples: tuple[FeedbackExample, ...] = ()  # few-shot pairwise judgements

    def __post_init__(self):
        if not self.principles:
            raise ConstitutionError(f"constitution {self.name!r}: the principle list is empty; give at least one")
        seen: set[str] = set()
        for principle in self.principles:
            if principle.id in seen:
                raise ConstitutionError(f"constitution {self.name!r}: duplicate principle id {principle.id!r}")
            seen.add(principle.id)

    # -- lookups -----------------------------------------------------------------------------
    def principle(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        raise ConstitutionError(
            f"constitution {self.name!r} has no principle {principle_id!r} "
            f"(known: {', '.join(p.id for p in self.principles)})"
        )

    @property
    def critique_principles(self) -> tuple[Principle, ...]:
        return tuple(p for p in self.principles if p.for_critique)

    @property
    def comparison_principles(self) -> tuple[Principle, ...]:
        return tuple(p for p in self.principles if p.for_comparison)

    def example_requests(self, example: CritiqueExample) -> tuple[str, str]:
        """(critique request, revision request) shown in a critique few-shot example."""
        if example.principle:
            principle = self.principle(example.principle)
            return principle.critique_request, principle.revision_request
        return example.critique_request, example.revision_request

    def example_comparison(self, example: FeedbackExample) -> str:
        """The comparison question shown in a feedback few-shot example."""
        if example.principle:
            return self.principle(example.principle).comparison
        return self.comparison_principles[0].comparison

    @property
    def revision_guidance(self) -> str:
        """What a direct revision is told on top of its principle's revision request."""
        return (self.guidance or self.description).strip()

    # -- identity ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return configlib.to_dict(self)

    @property
    def hash(self) -> str:
        """sha256 hex of the canonical JSON (sorted keys, no whitespace) of the parsed constitution."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# -- YAML ------------------------------------------------------------------------------------------
def _check_references(constitution: Constitution, located: configlib.Located) -> None:
    """Cross-field checks that need the parsed whole, reported at the offending line."""
    ids = [p.id for p in constitution.principles]
    if not constitution.critique_principles:
        raise ConstitutionError(
            f"{located.where(('principles',))}: no principle has critique_request and revision_request; "
            f"SL-CAI needs at least one"
        )
    if not constitution.comparison_principles:
        raise ConstitutionError(
            f"{located.where(('principles',))}: no principle has a comparison question; AI feedback needs at least one"
        )
    for field, examples, need in (
        ("critique_examples", constitution.critique_examples, "for_critique"),
        ("feedback_examples", constitution.feedback_examples, "for_comparison"),
    ):
        for index, example in enumerate(examples):
            if not example.principle:
                continue
            where = located.where((field, str(index), "principle"))
            if example.principle not in ids:
                raise ConstitutionError(
                    f"{where}: unknown principle {example.principle!r}; expected one of {', '.join(ids)}"
                )
            if not getattr(constitution.principle(example.principle), need):
                kind = "critique_request/revision_request" if need == "for_critique" else "comparison"
                raise ConstitutionError(f"{where}: principle {example.principle!r} has no {kind} to show in this example")


def _check_unique_ids(principles: Any, located: configlib.Located) -> None:
    """Duplicate ids, found on the raw YAML so the error can name the duplicate's own line."""
    if not isinstance(principles, list):
        return  # build() reports the wrong type
    first_index: dict[str, int] = {}
    for index, item in enumerate(principles):
        principle_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(principle_id, str):
            continue
        if principle_id in first_index:
            raise ConstitutionError(
                f"{located.where(('principles', str(index), 'id'))}: duplicate principle id {principle_id!r} "
                f"(first used by principles[{first_index[principle_id]}]); ids must be unique"
            )
        first_index[principle_id] = index


def load_yaml_constitution(path: str | Path) -> Constitution:
    """Parse and validate a constitution YAML file; errors name the file, line and field."""
    path = Path(path)
    try:
        data, located = configlib.read_yaml(path)
    except configlib.ConfigError as err:
        raise ConstitutionError(str(err)) from None
    if not isinstance(data, dict):
        raise ConstitutionError(f"{path}: the top level must be a mapping with name, version and principles")
    principles = data.get("principles")
    if principles is None or principles == []:
        raise ConstitutionError(
            f"{located.where(('principles',))}: the principle list is "
            f"{'missing' if principles is None else 'empty'}; give at least one principle"
        )
    _check_unique_ids(principles, located)
    if isinstance(data.get("version"), (int, float)) and not isinstance(data.get("version"), bool):
        data = {**data, "version": str(data["version"])}  # `version: 1` is a natural thing to write
    try:
        constitution = configlib.build(Constitution, data, located)
    except configlib.ConfigError as err:
        raise ConstitutionError(str(err)) from None
    _check_references(constitution, located)
    return constitution


# -- the CAI paper's JSON layout -------------------------------------------------------------------
_TRANSCRIPT_MARKER = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConstitutionError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConstitutionError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConstitutionError(f"cannot read {path}: {err}") from None


def _strip_markers(text: str, head: str, tail: str) -> str:
    """'\\n\\nCritiqueRequest: X\\n\\nCritique:' -> 'X' (the paper stores requests with their transcript labels)."""
    text = text.strip()
    if text.startswith(head):
        text = text[len(head):]
    if text.endswith(tail):
        text = text[: -len(tail)]
    return text.strip()


def parse_paper_transcript(text: str, source: str) -> list[tuple[str, str]]:
    """Split a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript into (label, text) turns; empty trailing turns dropped."""
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")
    pieces = _TRANSCRIPT_MARKER.split(text)
    if pieces[0].strip():
        raise ConstitutionError(f"{source}: expected the text to start with 'Human:', got {pieces[0][:60]!r}")
    turns = [(label, body.strip()) for label, body in zip(pieces[1::2], pieces[2::2])]
    while turns and not turns[-1][1]:
        turns.pop()
    return turns


def _conversation(turns: list[tuple[str, str]], source: str) -> tuple[Message, ...]:
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = []
    for label, body in turns:
        if label not in roles:
            raise ConstitutionError(f"{source}: unexpected {label!r} turn inside the conversation")
        if not body:
            raise ConstitutionError(f"{source}: an empty {label} turn")
        messages.append(Message(roles[label], body))
    return tuple(messages)


def _paper_critique_example(text: str, source: str) -> CritiqueExample:
    turns = parse_paper_transcript(text, source)
    labels = [label for label, _ in turns]
    try:
        start = labels.index("CritiqueRequest")
    except ValueError:
        raise ConstitutionError(f"{source}: no 'CritiqueRequest:' turn; expected a dialogue then a critique and revision") from None
    tail = dict(turns[start:start + 4])
    if [label for label, _ in turns[start:start + 4]] != ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]:
        raise ConstitutionError(
            f"{source}: expected CritiqueRequest, Critique, RevisionRequest, Revision after the dialogue, got {labels[start:]}"
        )
    try:
        return CritiqueExample(
            messages=_conversation(turns[:start], source),
            critique=tail["Critique"],
            revision=tail["Revision"],
            critique_request=tail["CritiqueRequest"],
            revision_request=tail["RevisionRequest"],
        )
    except ValueError as err:
        raise ConstitutionError(f"{source}: {err}") from None


def _paper_feedback_example(item: Any, source: str) -> FeedbackExample:
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ConstitutionError(f"{source}: expected an object with 'prompt', 'corrects' and 'incorrects'")
    answers = {}
    for key in ("corrects", "incorrects"):
        value = item.get(key)
        if not isinstance(value, list) or not value or not isinstance(value[0], str):
            raise ConstitutionError(f"{source}: '{key}' must be a non-empty list of strings")
        answers[key] = value[0].strip()
    turns = parse_paper_transcript(item["prompt"], source)
    try:
        return FeedbackExample(messages=_conversation(turns, source), chosen=answers["corrects"], rejected=answers["incorrects"])
    except ValueError as err:
        raise ConstitutionError(f"{source}: {err}") from None


def load_paper_constitution(directory: str | Path, name: str = "cai-paper", version: str = "2022-12") -> Constitution:
    """A constitution from a directory holding the CAI paper's published JSON files.

    CritiqueRevisionInstructions.json ({"harmful0": {"prompt": [critique request], "edit_request": ...}})
    and RLMadisonInstructions.json (list of comparison principles) are required; the two few-shot
    files are read when present. Critique principles keep their keys as ids; comparison principles
    get ids "rl0", "rl1", ...
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConstitutionError(f"{directory} is not a directory holding the CAI paper's constitution files")
    principles: list[Principle] = []

    path = directory / PAPER_FILES["critique"]
    critique = _read_json(path)
    if not isinstance(critique, dict) or not critique:
        raise ConstitutionError(f"{path}: expected a non-empty JSON object of {{id: {{'prompt': [...], 'edit_request': ...}}}}")
    for key, value in critique.items():
        prompt = value.get("prompt") if isinstance(value, dict) else None
        edit = value.get("edit_request") if isinstance(value, dict) else None
        if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], str) or not isinstance(edit, str):
            raise ConstitutionError(
                f"{path}, key {key!r}: expected {{'prompt': [critique request string], 'edit_request': revision request string}}"
            )
        try:
            principles.append(Principle(
                id=key,
                critique_request=_strip_markers(prompt[0], "CritiqueRequest:", "Critique:"),
                revision_request=_strip_markers(edit, "RevisionRequest:", "Revision:"),
            ))
        except ValueError as err:
            raise ConstitutionError(f"{path}, key {key!r}: {err}") from None

    path = directory / PAPER_FILES["comparison"]
    comparisons = _read_json(path)
    if not isinstance(comparisons, list) or not comparisons or not all(isinstance(c, str) and c.strip() for c in comparisons):
        raise ConstitutionError(f"{path}: expected a non-empty JSON list of comparison principle strings")
    principles += [Principle(id=f"rl{i}", comparison=_strip_markers(text, "", "Options:")) for i, text in enumerate(comparisons)]

    critique_examples: list[CritiqueExample] = []
    path = directory / PAPER_FILES["critique_examples"]
    if path.exists():
        items = _read_json(path)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ConstitutionError(f"{path}: expected a JSON list of dialogue strings")
        critique_examples = [_paper_critique_example(s, f"{path}, item {i}") for i, s in enumerate(items)]

    feedback_examples: list[FeedbackExample] = []
    path = directory / PAPER_FILES["feedback_examples"]
    if path.exists():
        items = _read_json(path)
        if not isinstance(items, list):
            raise ConstitutionError(f"{path}: expected a JSON list of {{'prompt', 'corrects', 'incorrects'}} objects")
        feedback_examples = [_paper_feedback_example(item, f"{path}, item {i}") for i, item in enumerate(items)]

    try:
        return Constitution(
            name=name,
            version=version,
            principles=tuple(principles),
            description=f"loaded from the CAI paper's JSON files in {directory.name}",
            critique_examples=tuple(critique_examples),
            feedback_examples=tuple(feedback_examples),
        )
    except ConstitutionError as err:
        raise ConstitutionError(f"{directory}: {err}") from None


# -- one entry point -------------------------------------------------------------------------------
def load_constitution(source: str | Path) -> Constitution:
    """A constitution from a YAML file, a directory in the paper's JSON layout, or a shipped name ('default')."""
    path = Path(source)
    if path.is_dir():
        return load_paper_constitution(path)
    if path.is_file():
        return load_yaml_constitution(path)
    shipped = CONSTITUTIONS_DIR / f"{source}.yaml"
    if "/" not in str(source) and shipped.is_file():
        return load_yaml_constitution(shipped)
    names = sorted(p.stem for p in CONSTITUTIONS_DIR.glob("*.yaml"))
    raise ConstitutionError(
        f"constitution {str(source)!r}: no such file or directory; expected a YAML file, a directory with the "
        f"CAI paper's JSON files, or a shipped name ({', '.join(names) or 'none found'})"
    )
