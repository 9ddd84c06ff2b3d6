"""How the supervised stages (SFT, preference model, DPO) draw batches from their data."""

from trainer.learners.base import batch_rows


def _epoch(steps, batch_size, n, seed=0):
    return [row for step in range(steps) for row in batch_rows(step, batch_size, n, seed)]


def test_every_row_once_per_epoch_in_a_new_order_each_epoch():
    first, second = _epoch(5, 4, 20)[:20], _epoch(10, 4, 20)[20:]
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != list(range(20))  # not the file's order: its blocks by source would come in a row
    assert first != second


def test_an_epoch_that_ends_inside_a_batch_continues_with_the_next_epochs_order():
    rows = _epoch(3, 4, 10)  # 12 rows: one epoch of 10 and 2 of the next
    assert sorted(rows[:10]) == list(range(10))
    assert rows[10:] == _epoch(5, 4, 10)[10:12]


def test_batches_depend_only_on_the_step_and_seed():
    # a resumed run asks for step 7 without having drawn steps 0–6, and gets the same batch
    assert batch_rows(7, 8, 30, 3) == _epoch(8, 8, 30, 3)[56:64]
    assert batch_rows(7, 8, 30, 3) != batch_rows(7, 8, 30, 4)


def test_source_blocks_are_mixed_within_the_first_batches():
    # labels.jsonl lists 70 revision pairs, then 110 contrast pairs: the first 4 batches of 8 see both
    rows = _epoch(4, 8, 180)
    assert any(r < 70 for r in rows) and any(r >= 70 for r in rows)
