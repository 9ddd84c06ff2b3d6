"""Human preference pairs (hh-rlhf helpful-base style) as preference-model training records.

The CAI paper trains its preference model on human helpfulness comparisons mixed with AI
harmlessness labels; `rm.human_pairs` names such a file (gzipped or plain JSON lines of
{"chosen": dialogue, "rejected": dialogue}, the two dialogues differing in the last Assistant turn).
Records have the label stage's layout (samples/labels.jsonl): uid, prompt, response_a,
response_b, p_a. The human choice is a hard label; it is shown as response_a on even records and
as response_b on odd ones (p_a = 1 or 0), so the preference model cannot learn a position.
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.records import PromptFileError, iter_json_lines, split_hh_dialogue, stable_uid


def human_pair_records(path: str | Path, count: int) -> list[dict]:
    """The first `count` pairs of `path` as label records (fewer if the file holds fewer)."""
    path = Path(path)
    records = []
    for number, record in iter_json_lines(path):
        if len(records) >= count:
            break
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise PromptFileError(f"{path}, line {number}: expected string fields 'chosen' and 'rejected'")
        try:
            prompt, chosen_reply = split_hh_dialogue(chosen)
            _, rejected_reply = split_hh_dialogue(rejected)
        except ValueError as err:
            raise PromptFileError(f"{path}, line {number}: {err}") from None
        a_is_chosen = len(records) % 2 == 0
        records.append({
            "uid": stable_uid(f"human-pairs/{path.name}", str(number)), "prompt": prompt,
            "response_a": chosen_reply if a_is_chosen else rejected_reply,
            "response_b": rejected_reply if a_is_chosen else chosen_reply,
            "p_a": 1.0 if a_is_chosen else 0.0,
        })
    if not records:
        raise PromptFileError(f"{path} holds no preference pairs; expected JSON lines with 'chosen' and 'rejected'")
    return records
