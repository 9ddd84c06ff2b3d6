"""One call per prompt set: a spec string names it, TFDS builds it once into `data_dir`, prompts come back.

Spec strings:
  default:red_team_train | default:red_team_heldout | default:helpful_train | default:helpful_heldout
  default:benign_risky_train | default:benign_risky_rl
      the small sets shipped with cairl (written by us; benign_risky_train: benign requests worded like risky
      ones, "How do I terminate a running loop in JavaScript?", disjoint from the overrefusal evaluation set;
      benign_risky_rl: more of them, for the RL stage only (data.ppo_sets), disjoint from both)
  path/to/file.jsonl[.gz]                 a local {"prompt": ...} JSON-lines file
  hh-rlhf/harmless-base[:test]            hh-rlhf dialogues (prompt = up to the last Assistant turn)
  hh-rlhf/helpful-base[:test]
  red-team                                red-team first human turns
Public sets download from GitHub unless `manual_dir` holds the upstream files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.data.records import Prompt, PromptFileError

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_SETS = ("red_team_train", "red_team_heldout", "helpful_train", "helpful_heldout", "benign_risky_train",
                "benign_risky_rl")
DEFAULT_SETS = {name: PACKAGE_DIR / f"{name}.jsonl" for name in SHIPPED_SETS}
HH_SUBSETS = ("harmless-base", "helpful-base")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with two human-ranked replies (hh-rlhf): for checking AI labels against human ones."""

    uid: str
    prompt: str
    chosen: str
    rejected: str


def _examples(builder, split: str, manual_dir):
    from trainer.data.builders import decode, prepare

    sources = prepare(builder, manual_dir)
    if split not in sources:
        raise PromptFileError(f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''} has no "
                              f"split {split!r}; available: {', '.join(sources)}")
    source = sources[split]
    return [decode(source[i]) for i in range(len(source))]


def _hh_builder(spec: str, data_dir):
    from trainer.data.builders import HhRlhf

    name, _, split = spec.partition(":")
    subset = name.split("/", 1)[1] if "/" in name else ""
    if subset not in HH_SUBSETS:
        raise PromptFileError(f"prompt set {spec!r}: unknown hh-rlhf subset {subset!r}; expected one of {', '.join(HH_SUBSETS)}")
    return HhRlhf(config=subset.replace("-", "_"), data_dir=str(data_dir), file_format="array_record"), split or "train"


def load_prompt_set(spec: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                    limit: int | None = None) -> list[Prompt]:
    """The prompts a spec names (see the module docstring), in source order, at most `limit` of them."""
    from trainer.data.builders import LocalPrompts, RedTeamPrompts

    if spec.startswith("default:"):
        name = spec.split(":", 1)[1]
        if name not in DEFAULT_SETS:
            raise PromptFileError(f"prompt set {spec!r}: no shipped set {name!r}; expected one of "
                                  f"{', '.join('default:' + n for n in DEFAULT_SETS)}")
        builder, split, source = LocalPrompts.for_file(DEFAULT_SETS[name], data_dir, source=name), "train", name
    elif spec.startswith("hh-rlhf"):
        builder, split = _hh_builder(spec, data_dir)
        source = f"hh-rlhf/{builder.subset}/{split}"
    elif spec.split(":")[0] == "red-team":
        builder, split, source = RedTeamPrompts(data_dir=str(data_dir), file_format="array_record"), "train", "red-team"
    elif spec.endswith((".jsonl", ".jsonl.gz")) or Path(spec).is_file():
        builder, split = LocalPrompts.for_file(spec, data_dir), "train"
        source = builder.builder_config.source
    else:
        raise PromptFileError(
            f"prompt set {spec!r}: expected a .jsonl file, 'default:<name>' ({', '.join(DEFAULT_SETS)}), "
            f"'hh-rlhf/harmless-base[:split]', 'hh-rlhf/helpful-base[:split]' or 'red-team'"
        )
    examples = _examples(builder, split, manual_dir)
    if limit is not None:
        examples = examples[:limit]
    return [Prompt(uid=e["uid"], text=e["prompt"], source=source) for e in examples]


def load_response_pairs(spec: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                        limit: int | None = None) -> list[PreferencePair]:
    """hh-rlhf (prompt, chosen, rejected) triples, e.g. spec 'hh-rlhf/harmless-base:test'."""
    builder, split = _hh_builder(spec, data_dir)
    examples = _examples(builder, split, manual_dir)[:limit]
    return [PreferencePair(e["uid"], e["prompt"], e["chosen"], e["rejected"]) for e in examples]


def load_bbq(categories: list[str] | tuple[str, ...], data_dir: str | Path, manual_dir: str | Path | None = None,
             limit_per_category: int | None = None) -> list[dict]:
    """BBQ rows (decoded dicts, see builders.Bbq) of the named categories, e.g. ['Age', 'Religion']."""
    from trainer.data.builders import BBQ_CATEGORIES, Bbq

    rows: list[dict] = []
    for category in categories:
        if category not in BBQ_CATEGORIES:
            raise PromptFileError(f"BBQ: unknown category {category!r}; expected one of {', '.join(BBQ_CATEGORIES)}")
        builder = Bbq(config=category.lower(), data_dir=str(data_dir), file_format="array_record")
        rows += _examples(builder, "test", manual_dir)[:limit_per_category]
    return rows
