"""Prompts and their stable ids, read from JSONL files with errors that name the file and line.

A prompt file has one JSON object per line with a "prompt" string (and optionally its own "uid").
Every prompt gets a uid that does not depend on where or when it is read, so the rollout ledger can
track each prompt exactly once across workers, restarts and resumes.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from models.errors import UserError

ASSISTANT_TURN = "\n\nAssistant:"


# Control characters other than tab, newline and carriage return, and lone UTF-16 surrogates (JSON's "\ud800"
# decodes to one; it cannot be written back as UTF-8, so a run holding it could never record its result).
NON_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class PromptFileError(UserError, ValueError):
    """A prompt or dataset file that cannot be read as the expected JSON lines."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: plain text, or a '\\n\\nHuman: ...\\n\\nAssistant:' transcript (hh-rlhf style)."""

    uid: str  # stable id: the same prompt from the same source always gets the same uid
    text: str  # what the model is asked
    source: str = ""  # the set it came from, e.g. "red_team_train" or "hh-rlhf/harmless-base/test"


def stable_uid(source: str, key: str) -> str:
    """'<source>-<first 16 hex of sha256(source NUL key)>': stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{source}\0{key}".encode("utf-8")).hexdigest()[:16]
    return f"{source.replace('/', '.')}-{digest}"


def open_text(path: Path):
    """Open a text file, transparently gunzipping `.gz` files."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises PromptFileError naming it."""
    path = Path(path)
    try:
        handle = open_text(path)
    except FileNotFoundError:
        raise PromptFileError(f"{path} does not exist; expected a JSON-lines file") from None
    except OSError as err:
        raise PromptFileError(f"cannot read {path}: {err.strerror}") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptFileError(
                        f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                        f'expected one JSON object per line, e.g. {{"prompt": "How do I ...?"}}'
                    ) from None
                if not isinstance(value, dict):
                    raise PromptFileError(
                        f"{path}, line {number}: expected a JSON object, got a JSON {type(value).__name__}"
                    )
                yield number, value
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
            raise PromptFileError(f"{path}: cannot decode the file ({err}); expected UTF-8 JSON lines") from None


def read_prompt_file(path: str | Path, source: str | None = None) -> list[Prompt]:
    """Prompts of a JSONL file (`{"prompt": str, "uid"?: str}` per line), in file order.

    The uid is the line's own "uid" if given, else `stable_uid(source, text)`; a repeated text gets
    '#2', '#3', ... appended, so uids stay unique and do not shift when other lines are added.
    """
    path = Path(path)
    source = source or path.name.split(".")[0]
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    uid_lines: dict[str, int] = {}
    for number, record in iter_json_lines(path):
        text = record.get("prompt")
        if text is None:
            raise PromptFileError(
                f"{path}, line {number}: missing the \"prompt\" field (keys present: {', '.join(record) or 'none'}); "
                f'expected {{"prompt": "..."}}'
            )
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(f"{path}, line {number}: \"prompt\" must be a non-empty string, got {text!r:.80}")
        if bad := NON_TEXT.search(text):
            kind = "a lone surrogate" if 0xD800 <= ord(bad.group()) <= 0xDFFF else "a control character"
            raise PromptFileError(
                f"{path}, line {number}: \"prompt\" holds the non-text character U+{ord(bad.group()):04X} at "
                f"character {bad.start() + 1} ({kind}); expected plain text (newlines and tabs are fine)")
        uid = record.get("uid")
        if uid is None:
            seen[text] = seen.get(text, 0) + 1
            uid = stable_uid(source, text if seen[text] == 1 else f"{text}#{seen[text]}")
        elif not isinstance(uid, str) or not uid:
            raise PromptFileError(f"{path}, line {number}: \"uid\" must be a non-empty string, got {uid!r}")
        if uid in uid_lines:
            raise PromptFileError(f"{path}, line {number}: uid {uid!r} already used on line {uid_lines[uid]}")
        uid_lines[uid] = number
        prompts.append(Prompt(uid=uid, text=text, source=source))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts; expected one JSON object per line, e.g. {{\"prompt\": \"...\"}}")
    return prompts


def split_hh_dialogue(dialogue: str) -> tuple[str, str]:
    """(prompt, final reply) of an hh-rlhf dialogue: the prompt runs up to and including the last '\\n\\nAssistant:'."""
    cut = dialogue.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the dialogue")
    end = cut + len(ASSISTANT_TURN)
    return dialogue[:end], dialogue[end:].strip()


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def transcript_turns(transcript: str) -> tuple[str, list[tuple[str, str]]]:
    """The one parser of 'Human: ...\\n\\nAssistant: ...' transcripts (hh-rlhf): the text before the first
    turn, and each turn as (speaker 'Human' | 'Assistant', its text), both stripped."""
    pieces = _TURN.split(transcript.strip())
    return pieces[0].strip(), [(speaker, body.strip()) for speaker, body in zip(pieces[1::2], pieces[2::2])]


def first_human_turn(transcript: str) -> str:
    """The first Human turn of a transcript (the red-team prompt); a text with no turns is returned whole."""
    preamble, turns = transcript_turns(transcript)
    return next((body for speaker, body in turns if speaker == "Human"), preamble)
