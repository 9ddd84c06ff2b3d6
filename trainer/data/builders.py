"""TensorFlow Datasets builders for the prompt and evaluation sets (array_record files, no TensorFlow).

    builder = LocalPrompts.for_file("my_prompts.jsonl", data_dir)
    source = prepare(builder)["train"]          # tfds data source: random access, Grain-friendly
    source[0]  ->  {"uid": b"...", "prompt": b"..."}   (text comes back as bytes)

Public sets are downloaded from their GitHub URLs, or read from `manual_dir` when it holds them
(the same file names as upstream), which is how the tests run offline. Examples are written in
source order (`disable_shuffling`), so index i is the i-th record of the source file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from trainer.data.records import (
    PromptFileError,
    first_human_turn,
    iter_json_lines,
    open_text,
    read_prompt_file,
    split_hh_dialogue,
    stable_uid,
)

HH_RLHF_URL = "https://github.com/anthropics/hh-rlhf/raw/master/{subset}/{split}.jsonl.gz"
RED_TEAM_URL = "https://github.com/anthropics/hh-rlhf/raw/master/red-team-attempts/red_team_attempts.jsonl.gz"
BBQ_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data/{category}.jsonl"
BBQ_CATEGORIES = (
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
    "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
)

_text = tfds.features.Text


def _manual_dir(dl_manager) -> Path | None:
    """The user's manual_dir, or None when none was given (TFDS raises on access then)."""
    try:
        path = dl_manager.manual_dir
    except (AssertionError, ValueError, OSError):
        return None
    return Path(path) if path is not None and Path(path).is_dir() else None


def _download(dl_manager, url: str, relative: str) -> Path:
    try:
        return Path(dl_manager.download(url))
    except Exception as err:  # network errors come wrapped in several layers (requests, promise, tfds)
        raise PromptFileError(
            f"could not download {url} ({type(err).__name__}); to work offline, put the file at "
            f"<manual_dir>/{relative} and pass manual_dir"
        ) from None


def _local_or_download(dl_manager, relative: str, url: str) -> Path:
    manual = _manual_dir(dl_manager)
    if manual is not None and (manual / relative).is_file():
        return manual / relative
    return _download(dl_manager, url, relative)


def _text_value(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise PromptFileError(f"{where}: expected a string field {key!r}, got {value!r:.80}")
    return value


# -- local JSONL prompt sets -----------------------------------------------------------------------
@dataclasses.dataclass
class PromptFileConfig(tfds.core.BuilderConfig):
    path: str = ""  # the JSONL prompt file
    source: str = ""  # the name uids are derived from


class LocalPrompts(tfds.core.GeneratorBasedBuilder):
    """A local `{"prompt": ...}` JSONL file; one split, 'train'. Features: uid, prompt."""

    VERSION = tfds.core.Version("1.0.0")

    @classmethod
    def for_file(cls, path: str | Path, data_dir: str | Path, source: str | None = None) -> "LocalPrompts":
        """Builder for `path`; the config name carries a hash of the file, so an edited file is rebuilt."""
        path = Path(path)
        read_prompt_file(path, source)  # validate before TFDS starts: errors name the file and line
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        source = source or path.name.split(".")[0]
        name = re.sub(r"[^A-Za-z0-9_]", "_", source) + "_" + digest
        return cls(config=PromptFileConfig(name=name, path=str(path.resolve()), source=source), data_dir=str(data_dir),
                   file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Prompts from a local JSON-lines file.",
            features=tfds.features.FeaturesDict({"uid": _text(), "prompt": _text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self.builder_config.path, self.builder_config.source)}

    def _generate_examples(self, path: str, source: str):
        for index, prompt in enumerate(read_prompt_file(path, source)):
            yield index, {"uid": prompt.uid, "prompt": prompt.text}


# -- hh-rlhf -----------------------------------------------------------------------------------------
class HhRlhf(tfds.core.GeneratorBasedBuilder):
    """Anthropic HH-RLHF preference pairs (MIT). Features: uid, prompt, chosen, rejected.

    `prompt` is the dialogue up to and including its last '\\n\\nAssistant:'; chosen/rejected are the
    two final replies. manual_dir layout (as upstream): <subset>/<split>.jsonl.gz; with a manual_dir,
    only the splits found there are built.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="harmless_base", description="harmless-base: red-team dialogues"),
        tfds.core.BuilderConfig(name="helpful_base", description="helpful-base: helpfulness dialogues"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: place harmless-base/{train,test}.jsonl.gz and helpful-base/... from anthropics/hh-rlhf."

    @property
    def subset(self) -> str:
        return self.builder_config.name.replace("_", "-")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Anthropic HH-RLHF human preference data.",
            features=tfds.features.FeaturesDict({"uid": _text(), "prompt": _text(), "chosen": _text(), "rejected": _text()}),
            homepage="https://github.com/anthropics/hh-rlhf",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        manual = _manual_dir(dl_manager)
        if manual is not None and (manual / self.subset).is_dir():
            splits = [s for s in ("train", "test") if (manual / self.subset / f"{s}.jsonl.gz").is_file()]
        else:
            splits = ["train", "test"]
        return {
            split: self._generate_examples(
                _local_or_download(dl_manager, f"{self.subset}/{split}.jsonl.gz", HH_RLHF_URL.format(subset=self.subset, split=split)),
                split,
            )
            for split in splits
        }

    def _generate_examples(self, path: Path, split: str):
        source = f"hh-rlhf/{self.subset}/{split}"
        for index, (number, record) in enumerate(iter_json_lines(path)):
            where = f"{path}, line {number}"
            chosen = _text_value(record, "chosen", where)
            rejected = _text_value(record, "rejected", where)
            try:
                prompt, chosen_reply = split_hh_dialogue(chosen)
                rejected_prompt, rejected_reply = split_hh_dialogue(rejected)
            except ValueError as err:
                raise PromptFileError(f"{where}: {err}") from None
            yield index, {"uid": stable_uid(source, str(index)), "prompt": prompt, "chosen": chosen_reply,
                          "rejected": rejected_reply}


# -- red-team prompts ------------------------------------------------------------------------------
def _red_team_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Records of the official file (one JSON array of {"transcript", ...}) or of JSON lines ({"prompt"} or {"transcript"})."""
    with open_text(path) as handle:
        head = handle.read(1)
        while head and head.isspace():
            head = handle.read(1)
    if head == "[":
        with open_text(path) as handle:
            try:
                items = json.load(handle)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise PromptFileError(f"{path}, item {index}: expected a JSON object")
            yield f"{path}, item {index}", item
    else:
        for number, record in iter_json_lines(path):
            yield f"{path}, line {number}", record


class RedTeamPrompts(tfds.core.GeneratorBasedBuilder):
    """First human turns of Anthropic's red-team attempts (MIT). Features: uid, prompt. Repeated prompts are dropped.

    manual_dir: red_team_attempts.jsonl.gz (upstream, a JSON array of transcripts) or any *.jsonl[.gz]
    of {"prompt": ...} or {"transcript": ...} records.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: place red_team_attempts.jsonl.gz (anthropics/hh-rlhf) or a *.jsonl[.gz] of prompts."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Red-team prompts (first human turn of each red-team transcript).",
            features=tfds.features.FeaturesDict({"uid": _text(), "prompt": _text()}),
            homepage="https://github.com/anthropics/hh-rlhf/tree/master/red-team-attempts",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        manual = _manual_dir(dl_manager)
        local = sorted(manual.glob("*.jsonl.gz")) + sorted(manual.glob("*.jsonl")) if manual is not None else []
        official = [p for p in local if p.name.startswith("red_team_attempts")]
        path = (official or local or [None])[0]
        if path is None:
            path = _download(dl_manager, RED_TEAM_URL, "red_team_attempts.jsonl.gz")
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path: Path):
        seen: set[str] = set()
        index = 0
        for where, record in _red_team_records(path):
            if "prompt" in record:
                text = _text_value(record, "prompt", where).strip()
            else:
                text = first_human_turn(_text_value(record, "transcript", where))
            if not text or text in seen:
                continue
            seen.add(text)
            yield index, {"uid": stable_uid("red-team", text), "prompt": text}
            index += 1


# -- BBQ -------------------------------------------------------------------------------------------
class Bbq(tfds.core.GeneratorBasedBuilder):
    """BBQ bias benchmark (Parrish et al. 2022, CC-BY-4.0), one config per category; split 'test'.

    manual_dir: <Category>.jsonl as in nyu-mll/BBQ/data.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c.lower(), description=c) for c in BBQ_CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: place <Category>.jsonl files from nyu-mll/BBQ/data."

    @property
    def category(self) -> str:
        return self.builder_config.description

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="BBQ: a hand-built bias benchmark for question answering.",
            features=tfds.features.FeaturesDict({
                "uid": _text(), "category": _text(), "example_id": tfds.features.Scalar(dtype=np.int64),
                "question_index": _text(), "question_polarity": _text(), "context_condition": _text(),
                "context": _text(), "question": _text(), "ans0": _text(), "ans1": _text(), "ans2": _text(),
                "label": tfds.features.Scalar(dtype=np.int64),
                "answer_info": _text(),  # JSON: {"ans0": [text, group tag], ...}
                "stereotyped_groups": _text(),  # JSON list from additional_metadata
            }),
            homepage="https://github.com/nyu-mll/BBQ",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        path = _local_or_download(dl_manager, f"{self.category}.jsonl", BBQ_URL.format(category=self.category))
        return {"test": self._generate_examples(path)}

    def _generate_examples(self, path: Path):
        for index, (number, record) in enumerate(iter_json_lines(path)):
            where = f"{path}, line {number}"
            try:
                example = {
                    "uid": stable_uid(f"bbq/{self.category}", str(record["example_id"])),
                    "category": str(record["category"]),
                    "example_id": int(record["example_id"]),
                    "question_index": str(record["question_index"]),
                    "question_polarity": str(record["question_polarity"]),
                    "context_condition": str(record["context_condition"]),
                    "context": str(record["context"]), "question": str(record["question"]),
                    "ans0": str(record["ans0"]), "ans1": str(record["ans1"]), "ans2": str(record["ans2"]),
                    "label": int(record["label"]),
                    "answer_info": json.dumps(record["answer_info"]),
                    "stereotyped_groups": json.dumps(record.get("additional_metadata", {}).get("stereotyped_groups", [])),
                }
            except (KeyError, TypeError, ValueError) as err:
                raise PromptFileError(f"{where}: not a BBQ record ({type(err).__name__}: {err})") from None
            yield index, example


# -- building and reading --------------------------------------------------------------------------
def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | Path | None = None) -> dict[str, Any]:
    """Build `builder` if its files are not there yet; return {split: tfds data source}."""
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir is not None else None)
    builder.download_and_prepare(download_config=config)
    return builder.as_data_source()


def decode(example: dict[str, Any]) -> dict[str, Any]:
    """A data-source example with bytes decoded to str (TFDS returns text as bytes)."""
    return {k: v.decode("utf-8") if isinstance(v, bytes) else (int(v) if hasattr(v, "dtype") and v.ndim == 0 else v)
            for k, v in example.items()}
