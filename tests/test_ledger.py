"""The prompt ledger: exactly-once completion, release on worker death, durable resume."""

import json

import pytest

from trainer.ledger import Ledger, LedgerError, read_records, truncate_records


def test_take_complete_release_and_duplicates(tmp_path):
    ledger = Ledger.open(tmp_path / "s.jsonl", ["a", "b", "c", "d"])
    assert ledger.take(3, "w0") == ["a", "b", "c"]
    assert ledger.complete("a", {"x": 1})
    assert ledger.release(worker="w0") == ["b", "c"]  # w0 died with b, c in flight
    assert ledger.pending == ["b", "c", "d"]  # released uids go first
    assert ledger.take(10, "w1") == ["b", "c", "d"]
    for uid in "bcd":
        assert ledger.complete(uid, {"x": uid})
    assert not ledger.complete("b", {"x": "again"})  # a late duplicate is dropped, not written
    assert ledger.finished and ledger.duplicates == 1
    assert [r["uid"] for r in read_records(tmp_path / "s.jsonl")] == ["a", "b", "c", "d"]


def test_resume_skips_completed_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "s.jsonl"
    ledger = Ledger.open(path, ["a", "b", "c"])
    ledger.take(2, "w")
    ledger.complete("a", {"v": 1})
    with path.open("a") as f:
        f.write('{"uid": "b", "v": 2')  # killed mid-write
    again = Ledger.open(path, ["a", "b", "c"])
    assert again.done == {"a"} and again.pending == ["b", "c"]
    again.take(2, "w")
    again.complete("b", {"v": 2})
    assert [json.loads(line)["uid"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_records_of_other_prompts_are_an_error_unless_shared(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"uid": "zzz"}) + "\n")
    with pytest.raises(LedgerError, match="zzz"):
        Ledger.open(path, ["a"])
    assert Ledger.open(path, ["a"], strict=False).pending == ["a"]


def test_unknown_completion_and_duplicate_uids_raise(tmp_path):
    with pytest.raises(LedgerError, match="not unique"):
        Ledger(tmp_path / "s.jsonl", ["a", "a"])
    ledger = Ledger.open(tmp_path / "s.jsonl", ["a"])
    with pytest.raises(LedgerError, match="unknown"):
        ledger.complete("b", {})


def test_truncate_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"uid": f"it{i}/p", "iteration": i}) + "\n" for i in range(4)))
    assert truncate_records(path, lambda r: r["iteration"] < 2) == 2
    assert [r["iteration"] for r in read_records(path)] == [0, 1]
