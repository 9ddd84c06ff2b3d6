"""GRPO as the RL stage of a whole `cairl train` run on the tiny model (ppo.algorithm=grpo, no value
model): groups of responses in the ledger, the metrics it logs, and a SIGKILL inside the stage that a
resume finishes bit-identical to an uninterrupted run."""

import json

import numpy as np
import pytest

from pipeline_fixtures import run_train
from test_pipeline import check_evaluation
from test_resume import start_and_kill_when
from test_run_faults import _comparable, _final_params, _metric_rows
from trainer.ledger import read_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GROUP = 3
GRPO = ("ppo.algorithm=grpo", f"ppo.group.group_size={GROUP}", "ppo.batch_size=2")


@pytest.fixture(scope="module")
def grpo_run(tiny_model, tmp_path_factory):
    """One uninterrupted GRPO run, evaluated: what the killed-and-resumed run must end equal to."""
    runs = tmp_path_factory.mktemp("grpo")
    run_train(tiny_model, runs, *GRPO)
    return runs / "tiny"


def check_groups(run_dir):
    """Each iteration's prompts once each, every record a whole group of GROUP responses sampled at the
    iteration's one weight version (SL's is 1; iteration k samples at 1 + k)."""
    rollouts = read_records(run_dir / "samples" / "rollouts.jsonl")
    assert len(rollouts) == len({r["uid"] for r in rollouts}) == 3 * 2
    for r in rollouts:
        assert len(r["group_response_ids"]) == len(r["group_logprobs"]) == len(r["group_responses"]) == GROUP
        assert [len(x) for x in r["group_logprobs"]] == [len(x) for x in r["group_response_ids"]]
        assert r["version"] == 1 + r["iteration"]


def test_grpo_route_on_a_tiny_model(grpo_run):
    stages = json.loads((grpo_run / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("sl", "label", "rm", "ppo"))
    check_groups(grpo_run)
    metrics = read_records(grpo_run / "metrics.jsonl")
    rows = [m for m in metrics if m["stage"] == "ppo"]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        for name in ("reward_mean", "kl", "kl_ref", "entropy", "clip_fraction", "policy_loss", "degenerate_groups",
                     "response_length", "tokens_per_s"):
            assert f"ppo/{name}" in m, name
        assert "ppo/value_loss" not in m  # no value model
        assert 0 <= m["ppo/degenerate_groups"] <= 2
    assert [p.name for p in (grpo_run / "checkpoints" / "ppo-params").iterdir()] == ["3"]
    check_evaluation(grpo_run, metrics)  # base | SL | RL, the RL point at GRPO's final weights
    report = (grpo_run / "report.md").read_text()
    assert "## RL-CAI (GRPO)" in report and "Groups whose responses all scored the same" in report
    assert "Final iteration: KL" in report and "β" not in report.split("Final iteration:")[1].split("\n")[0]
    assert (grpo_run / "hf" / "model.safetensors").is_file()


def test_killed_inside_grpo_then_resumed_ends_bit_identical(tiny_model, grpo_run, tmp_path):
    run_dir = tmp_path / "tiny"

    def after_two_iterations():
        return len([m for m in read_records(run_dir / "metrics.jsonl") if m.get("stage") == "ppo"]) >= 2

    start_and_kill_when(tiny_model, tmp_path, after_two_iterations, *GRPO)
    assert not json.loads((run_dir / "stages.json").read_text()).get("ppo", {}).get("done")
    run_train(tiny_model, tmp_path, *GRPO, f"--resume={run_dir}")
    check_groups(run_dir)
    assert _comparable(_metric_rows(run_dir)) == _comparable(_metric_rows(grpo_run))
    want, got = _final_params(grpo_run), _final_params(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
