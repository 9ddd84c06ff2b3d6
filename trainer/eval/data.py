"""What each suite reads: the shipped prompt sets (or the user's), and local copies of public data.

`data_dir` has the layout of the public releases:
    bbq/<Category>.jsonl                          nyu-mll/BBQ data/ (any subset of the 11 categories)
    cai/evals/438HHHEvaluations.jsonl             anthropics/ConstitutionalHarmlessnessPaper evals/
    cai/evals/HarmfulVsEthical.jsonl
    hh-rlhf/harmless-base/test.jsonl.gz           anthropics/hh-rlhf
    hh-rlhf/helpful-base/test.jsonl.gz
`check_inputs` verifies all of it before any model runs, so bad input fails with nothing written.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from models.errors import UserError
from trainer.data.records import Prompt, PromptFileError, iter_json_lines, read_prompt_file
from trainer.eval.config import DATA_SUITES, EvalConfig

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED_PROMPTS = {suite: PACKAGE_DATA / f"eval_{suite}.jsonl" for suite in ("harmless", "overrefusal", "helpful")}
HHH_FILES = {"hhh": "438HHHEvaluations.jsonl", "harmful_vs_ethical": "HarmfulVsEthical.jsonl"}
HH_SUBSETS = ("harmless-base", "helpful-base")


class EvalDataError(UserError, ValueError):
    """Evaluation data that is missing or cannot be read."""


def evenly_spaced(items: list, count: int) -> list:
    """`count` items spread over the whole list (all of them if there are fewer): a cap that keeps
    every part of a file (BBQ files are grouped by template and condition) represented."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def prompt_file(config: EvalConfig, suite: str) -> Path:
    return Path(config.prompts[suite]).expanduser() if suite in config.prompts else SHIPPED_PROMPTS[suite]


def load_prompts(config: EvalConfig, suite: str) -> list[Prompt]:
    """The suite's prompts (the user's file if given), the first `cap` of them."""
    return read_prompt_file(prompt_file(config, suite), f"eval_{suite}")[: config.cap(suite)]


def bbq_categories(data_dir: Path) -> list[str]:
    from trainer.data.builders import BBQ_CATEGORIES

    return [c for c in BBQ_CATEGORIES if (data_dir / "bbq" / f"{c}.jsonl").is_file()]


def _required_files(suite: str, data_dir: Path) -> list[Path]:
    if suite == "hhh":
        return [data_dir / "cai" / "evals" / name for name in HHH_FILES.values()]
    if suite == "pm_human":
        return [data_dir / "hh-rlhf" / subset / "test.jsonl.gz" for subset in HH_SUBSETS]
    return []


def check_inputs(config: EvalConfig) -> None:
    """Every prompt file parses and every data suite finds its files; raise naming what and where."""
    for suite in config.suites:
        if suite in config.prompts or suite in SHIPPED_PROMPTS:
            load_prompts(config, suite)  # names the file and line of a bad or empty prompt file
        if suite not in DATA_SUITES:
            continue
        if not config.data_dir:
            raise EvalDataError(f"suite {suite!r} reads data the project cannot ship ({DATA_SUITES[suite]}); "
                                f"give --data-dir (or eval.data_dir) pointing to a directory that holds it")
        data_dir = Path(config.data_dir).expanduser()
        if not data_dir.is_dir():
            raise EvalDataError(f"data dir {data_dir} (for suite {suite!r}) does not exist; expected a directory "
                                f"holding {DATA_SUITES[suite]}")
        missing = [str(p) for p in _required_files(suite, data_dir) if not p.is_file()]
        if suite == "bbq" and not bbq_categories(data_dir):
            missing = [f"{data_dir / 'bbq'}/<Category>.jsonl (e.g. Age.jsonl)"]
        if missing:
            raise EvalDataError(f"suite {suite!r}: missing {', '.join(missing)} in data dir {data_dir}; expected "
                                f"{DATA_SUITES[suite]} (the layout of the public releases)")


def tfds_dir(source: Path) -> Path:
    """Where TFDS builds `source`: a directory named by the file's path, size and modification time.

    The BBQ and hh-rlhf builders are named by category/subset only, so one shared build directory
    would serve a stale build when another data dir (or an edited file) holds the same category.
    """
    from models.fetch import cache_root

    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "tfds" / "eval" / key


def load_bbq_rows(config: EvalConfig) -> list[dict]:
    """BBQ rows through the TFDS builder, `cap` rows per category spread evenly over each file."""
    from trainer.data.load import load_bbq

    data_dir = Path(config.data_dir).expanduser()
    rows = []
    for category in bbq_categories(data_dir):
        build_dir = tfds_dir(data_dir / "bbq" / f"{category}.jsonl")
        rows += evenly_spaced(load_bbq([category], build_dir, data_dir / "bbq"), config.cap("bbq"))
    return rows


def load_human_pairs(config: EvalConfig, subset: str):
    """hh-rlhf test pairs of `subset` through the TFDS builder, `cap` of them spread over the file."""
    from trainer.data.load import load_response_pairs

    manual_dir = Path(config.data_dir).expanduser() / "hh-rlhf"
    pairs = load_response_pairs(f"hh-rlhf/{subset}:test", tfds_dir(manual_dir / subset / "test.jsonl.gz"), manual_dir)
    return evenly_spaced(pairs, config.cap("pm_human"))


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question of the CAI paper's evals: its full text (ending "The answer is:") and the right letter."""

    uid: str
    question: str
    correct: str  # " (A)" or " (B)"
    incorrect: str


def _letter_list(value, where: str) -> str:
    items = ast.literal_eval(value) if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) != 1 or items[0].strip() not in ("(A)", "(B)"):
        raise EvalDataError(f"{where}: expected a one-letter list like [' (A)'], got {value!r:.60}")
    return items[0]


def load_choice_items(config: EvalConfig, key: str) -> list[ChoiceItem]:
    """Records of cai/evals/<file> (prompt, corrects, incorrects), `cap` of them spread over the file."""
    path = Path(config.data_dir).expanduser() / "cai" / "evals" / HHH_FILES[key]
    items = []
    for number, record in iter_json_lines(path):
        where = f"{path}, line {number}"
        if not isinstance(record.get("prompt"), str):
            raise PromptFileError(f"{where}: expected a string field 'prompt'")
        try:
            correct, incorrect = _letter_list(record.get("corrects"), where), _letter_list(record.get("incorrects"), where)
        except (ValueError, SyntaxError):
            raise EvalDataError(f"{where}: 'corrects'/'incorrects' must be lists like [' (A)']") from None
        items.append(ChoiceItem(f"{key}-{number}", record["prompt"], correct, incorrect))
    return evenly_spaced(items, config.cap("hhh"))
