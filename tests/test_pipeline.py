"""The whole pipeline (sl → label → rm → ppo) on a tiny random model with a real local Ray cluster,
through the `cairl train` entry point, and the run directory it leaves."""

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from pipeline_fixtures import ROOT, run_train, train_command
from trainer.ledger import read_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def check_finished_run(run_dir: Path, evaluated: bool = True):
    """Everything a finished tiny run must hold, each (stage, step) and prompt uid exactly once."""
    stages = json.loads((run_dir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("sl", "label", "rm", "ppo"))
    sl = read_records(run_dir / "samples" / "sl.jsonl")
    assert len(sl) == 4 and len({r["uid"] for r in sl}) == 4
    assert all(r["rounds"][0]["principle_id"] and r["constitution_hash"] for r in sl)
    labels = read_records(run_dir / "samples" / "labels.jsonl")
    assert len(labels) == 6 and len({r["uid"] for r in labels}) == 6
    assert all(0.0 <= r["p_a"] <= 1.0 and r["principle_ids"] for r in labels)
    rollouts = read_records(run_dir / "samples" / "rollouts.jsonl")
    assert sorted({r["iteration"] for r in rollouts}) == [0, 1, 2]
    assert len(rollouts) == len({r["uid"] for r in rollouts}) == 3 * 4
    metrics = read_records(run_dir / "metrics.jsonl")
    ppo_steps = [m["step"] for m in metrics if m["stage"] == "ppo"]
    assert ppo_steps == [1, 2, 3]
    for m in (m for m in metrics if m["stage"] == "ppo"):
        for name in ("reward_mean", "reward_std", "kl", "beta", "entropy", "clip_fraction", "approx_kl",
                     "value_loss", "explained_variance", "response_length", "tokens_per_s", "rollout_seconds",
                     "update_seconds"):
            assert f"ppo/{name}" in m, name
    assert [m["step"] for m in metrics if m["stage"] == "sl"] == [1, 2]
    assert "pm_reward_before" in stages["ppo"] and "pm_reward_after" in stages["ppo"]
    report = (run_dir / "report.md").read_text()
    assert "critique" in report and "held-out accuracy" in report and "KL" in report
    assert (run_dir / "plots" / "ppo.png").stat().st_size > 1000
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "hf" / "model.safetensors").is_file()
    assert [p.name for p in (run_dir / "checkpoints" / "ppo-params").iterdir()] == ["3"]  # what `cairl eval RUN:rl` reads
    assert list((run_dir / "tb").iterdir())
    assert "model:" in (run_dir / "config.yaml").read_text()
    if evaluated:
        check_evaluation(run_dir, metrics)
    else:
        assert not any(m["stage"] == "eval" for m in metrics) and "eval" not in stages
    return stages, metrics


def check_evaluation(run_dir: Path, metrics: list[dict]):
    """The base | SL | RL evaluation: finite values in metrics.jsonl (stage eval, steps 0-2), the table at the
    top of the report, and each policy's replies produced by the weight version its stage ended with."""
    import math

    rows = [m for m in metrics if m["stage"] == "eval"]
    assert [m["step"] for m in rows] == [0, 1, 2]
    for row in rows:
        values = {k: v for k, v in row.items() if k.startswith("eval/")}
        assert {"eval/harmless/harmful_rate", "eval/harmless/refusal_or_redirect_rate",
                "eval/overrefusal/refusal_rate", "eval/helpful/mean_words"} <= set(values)
        assert all(v is not None and math.isfinite(v) for v in values.values())
    assert "eval/helpful/win_rate" in rows[1] and "eval/helpful/win_rate" in rows[2]
    report = (run_dir / "report.md").read_text()
    assert report.index("## Evaluation: base → SL → RL") < report.index("## Stages")
    assert "| suite | metric | n | base | SL | RL |" in report
    final_version = max(m["ppo/version"] for m in metrics if m["stage"] == "ppo")
    assert json.loads((run_dir / "stages.json").read_text())["ppo"]["final_version"] == final_version  # what rl asks
    ledgers = run_dir / "eval" / "ledgers"
    for point, version in (("base", 0), ("sl", 1), ("rl", final_version)):
        assert {r["version"] for r in read_records(ledgers / f"{point}-replies.jsonl")} == {version}, point
    comparison = json.loads((run_dir / "eval" / "eval-2.json").read_text())
    assert comparison["model"] == "tiny:rl" and comparison["baseline"] == "tiny:base"


def test_whole_pipeline_on_a_tiny_model(reference_run):
    """The session's reference run (tests/conftest.py): planned first, then every stage, evaluated."""
    run_dir = reference_run.dir
    assert "sl train" in reference_run.stderr and "ppo" in reference_run.stderr  # progress bars on stderr
    check_finished_run(run_dir)
    assert json.loads((run_dir / "plan.json").read_text())["fits"] is True  # the pre-flight plan
    # The exported policy loads back as a model source and is the final RL policy, weight for weight.
    import numpy as np
    from flax import nnx

    from models.sources import load_checkpoint
    from trainer.eval.sources import load_policy

    exported = load_checkpoint(str(run_dir)).params
    rl = dict(nnx.to_flat_state(nnx.state(load_policy(f"{run_dir}:rl").model, nnx.Param)))
    assert len(exported) == len(rl) > 0
    for path, array in exported.items():
        np.testing.assert_allclose(np.asarray(rl[tuple(path)][...]), np.asarray(array), rtol=0, atol=1e-6)


def test_selected_stages_then_the_rest(tiny_model, tmp_path):
    run_train(tiny_model, tmp_path, "run.stages=[sl,label]")
    stages = json.loads((tmp_path / "tiny" / "stages.json").read_text())
    assert set(stages) == {"sl", "label", "eval"} and stages["eval"]["points"] == ["base", "sl"]
    assert not (tmp_path / "tiny" / "checkpoints" / "ppo").exists()
    proc = run_train(tiny_model, tmp_path)  # the run dir exists: resumes, skipping sl and label
    assert "sl critique" not in proc.stderr
    check_finished_run(tmp_path / "tiny")


def test_diverging_stage_stops_the_run_with_a_resumable_checkpoint(tiny_model, tmp_path):
    """Corrupt labels (p_a NaN) make every preference-model update non-finite, so each is skipped: after
    run.max_nonfinite_updates in a row the run saves the stage's state and stops (exit 2, no traceback)
    instead of training on to export."""
    samples = tmp_path / "tiny" / "samples"
    samples.mkdir(parents=True)
    pairs = [{"uid": f"u{i}", "prompt": "How do I help?", "response_a": "Like this.", "response_b": "No.",
              "p_a": float("nan")} for i in range(4)]
    (samples / "labels.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(train_command(tiny_model, tmp_path, "run.stages=[rm]", "rm.steps=6",
                                        "run.max_nonfinite_updates=2"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 consecutive updates had a non-finite loss" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "tiny" / "checkpoints" / "rm" / "2").is_dir()
    assert not json.loads((tmp_path / "tiny" / "stages.json").read_text()).get("rm", {}).get("done")
    metrics = [m for m in read_records(tmp_path / "tiny" / "metrics.jsonl") if m["stage"] == "rm"]
    assert [(m["rm/skipped"], m["rm/nonfinite_streak"]) for m in metrics] == [(1.0, 1.0), (1.0, 2.0)]


def test_recipe_route_direct_revisions_helpful_answers_and_revision_pairs(tiny_model, tmp_path):
    """The recipe's route (configs/smollm2-cai.yaml): direct revisions, benign prompts answered into
    the SFT data, preference pairs from the revisions and from benign answers against written refusals,
    prompt sets cycled."""
    run_train(tiny_model, tmp_path, "sl.revision_style=direct", "sl.helpful_sources=[helpful_train,benign_risky_train]",
              "data.prompts=[default:red_team_train,default:helpful_train,default:benign_risky_train]",
              "label.pairs=revisions", "label.refusal_contrast=true", "label.harmful_contrast=true",
              "data.cycle_sets=true", "data.sl_prompts=9", "rm.heldout_fraction=0.5")
    run_dir = tmp_path / "tiny"
    revised = read_records(run_dir / "samples" / "sl.jsonl")
    answered = read_records(run_dir / "samples" / "sl_answers.jsonl")
    assert len(revised) == 3 and len(answered) == 6  # 9 interleaved prompts: 3 of each set
    assert all(r["uid"].startswith("red_team_train") and r["rounds"][0]["critique"] == "" for r in revised)
    assert all(r["uid"].startswith(("helpful_train", "benign_risky_train")) and r["rounds"] == [] for r in answered)
    labels = read_records(run_dir / "samples" / "labels.jsonl")
    by_uid = {r["uid"]: r for r in revised + answered}
    revision_labels = [r for r in labels if r["source"] == "sl_revision"]
    contrast_labels = [r for r in labels if r["source"] == "refusal_contrast"]
    harmful_labels = [r for r in labels if r["source"] == "harmful_contrast"]
    assert revision_labels and len(revision_labels) + len(contrast_labels) + len(harmful_labels) == len(labels)
    assert all(r["p_a"] == 0.9 and r["response_a"] == by_uid[r["uid"]]["final_revision"].strip()
               for r in revision_labels)
    # the tiny model's answers never refuse: one written refusal preferred per revised prompt, as many
    # benign answers preferred to one (balanced to the smaller side)
    assert len(harmful_labels) == len(contrast_labels) == min(len(revised), len(answered))
    assert all(r["response_b"] == by_uid[r["uid"].removesuffix("/harmful-contrast")]["initial_response"].strip()
               for r in harmful_labels)
    assert all(r["response_a"] == by_uid[r["uid"].removesuffix("/contrast")]["final_revision"].strip()
               for r in contrast_labels)
    stages = json.loads((run_dir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("sl", "label", "rm", "ppo"))
    assert stages["sl"]["revised"] == 3 and stages["sl"]["answered"] == 6
    assert stages["label"]["pairs_by_source"] == {"sl_revision": len(revision_labels), "refusal_contrast": 3,
                                                  "harmful_contrast": 3}
    from trainer.stages.rm import split_labels

    _, heldout = split_labels(labels, 0.5)
    by_source = stages["rm"]["heldout_accuracy_by_source"]
    assert {s: v["pairs"] for s, v in by_source.items()} == dict(Counter(r["source"] for r in heldout))
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in by_source.values())
    assert "held-out accuracy by pair source" in (run_dir / "report.md").read_text()
    assert (run_dir / "hf" / "config.json").is_file()


def test_dpo_route_without_a_preference_model(tiny_model, tmp_path):
    """run.stages=[sl,label,dpo]: DPO of the SL policy on the AI labels is the run's RL policy — evaluated as the
    rl point (base | SL | RL), exported, and what RUN:rl names."""
    import numpy as np
    from flax import nnx

    from models.sources import load_checkpoint
    from trainer.eval.sources import load_policy

    run_train(tiny_model, tmp_path, "run.stages=[sl,label,dpo]")
    run_dir = tmp_path / "tiny"
    stages = json.loads((run_dir / "stages.json").read_text())
    assert set(stages) == {"sl", "label", "dpo", "eval"} and all(stages[s]["done"] for s in ("sl", "label", "dpo"))
    assert stages["dpo"]["heldout_accuracy_before"] == 0.5  # the policy starts as its reference: every pair a tie
    assert stages["dpo"]["train_pairs"] + stages["dpo"]["heldout_pairs"] == 6
    assert stages["dpo"]["final_version"] == 2  # the version after SL's: what the rl point asks for
    assert not (run_dir / "checkpoints" / "rm").exists() and not (run_dir / "checkpoints" / "ppo").exists()
    assert [p.name for p in (run_dir / "checkpoints" / "dpo-params").iterdir()] == ["2"]
    metrics = read_records(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["stage"] == "dpo"] == [1, 2]
    assert [m["step"] for m in metrics if m["stage"] == "dpo_eval"] == [0, 2]
    for m in (m for m in metrics if m["stage"] == "dpo"):
        assert {"dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_logprob", "dpo/rejected_logprob"} <= m.keys()
    assert [m["step"] for m in metrics if m["stage"] == "eval"] == [0, 1, 2]
    for point, version in (("base", 0), ("sl", 1), ("rl", 2)):
        replies = read_records(run_dir / "eval" / "ledgers" / f"{point}-replies.jsonl")
        assert {r["version"] for r in replies} == {version}, point
    report = (run_dir / "report.md").read_text()
    assert "| suite | metric | n | base | SL | RL |" in report and "## RL-CAI by DPO" in report
    exported = load_checkpoint(str(run_dir)).params
    rl = dict(nnx.to_flat_state(nnx.state(load_policy(f"{run_dir}:rl").model, nnx.Param)))
    sl = dict(nnx.to_flat_state(nnx.state(load_policy(f"{run_dir}:sl").model, nnx.Param)))
    assert len(exported) == len(rl) > 0
    for path, array in exported.items():
        np.testing.assert_allclose(np.asarray(rl[tuple(path)][...]), np.asarray(array), rtol=0, atol=1e-6)
    assert any(not np.array_equal(np.asarray(rl[tuple(p)][...]), np.asarray(sl[tuple(p)][...])) for p in exported)
