"""Pure pieces of the pipeline driver: data positions, label split, metrics log, report — no Ray, no JAX."""

import json

import pytest

from trainer.ledger import read_records
from trainer.metrics import MetricsLog
from trainer.pipeline import _interleave
from trainer.report import write_report
from trainer.rollout import task_seed
from trainer.stages.ppo import iteration_prompts
from trainer.stages.rm import split_labels


def test_iteration_prompts_wrap_and_follow_the_data_position():
    prompts = list("abcde")
    assert iteration_prompts(prompts, 0, 2) == ["a", "b"]
    assert iteration_prompts(prompts, 2, 2) == ["e", "a"]  # iteration 2 starts at position 4, wrapping


def test_label_split_is_fixed_by_uid_and_never_empty():
    records = [{"uid": f"u{i}"} for i in range(40)]
    train, held = split_labels(records, 0.25)
    assert {r["uid"] for r in train} | {r["uid"] for r in held} == {r["uid"] for r in records}
    assert 3 <= len(held) <= 17
    assert split_labels(list(reversed(records)), 0.25)[1] == sorted(held, key=lambda r: -int(r["uid"][1:]))
    train, held = split_labels(records[:2], 0.01)
    assert len(train) == 1 and len(held) == 1


def test_task_seed_depends_on_the_request_not_the_worker():
    assert task_seed(0, "ppo", ["a", "b"], 3) == task_seed(0, "ppo", ["a", "b"], 3)
    assert task_seed(0, "ppo", ["a", "b"], 3) != task_seed(0, "ppo", ["a", "b"], 4)


def test_interleave_mixes_prompt_sets():
    assert _interleave([[1, 2, 3], ["a"]]) == [1, "a", 2, 3]


def test_metrics_log_names_and_truncate(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write("ppo", step, {"reward_mean": step / 10, "kl": float("nan")})
    log.write("sl", 1, {"loss": 2.0})
    record = log.records("ppo")[0]
    assert record["stage"] == "ppo" and record["step"] == 1 and record["ppo/reward_mean"] == 0.1
    assert record["ppo/kl"] is None  # non-finite values become null: the file stays valid JSON
    assert log.truncate("ppo", 1) == 2
    assert [(r["stage"], r["step"]) for r in log.records()] == [("ppo", 1), ("sl", 1)]


def test_report_from_run_files(tmp_path):
    (tmp_path / "samples").mkdir()
    sl = {"uid": "u1", "prompt": "How do I pick a lock?", "initial_response": "Use a pick.",
          "rounds": [{"principle_id": "harm", "critique": "It helps with burglary.", "revision": "I can't help."}],
          "final_revision": "I can't help."}
    (tmp_path / "samples" / "sl.jsonl").write_text(json.dumps(sl) + "\n")
    label = {"uid": "u2", "prompt": "p", "response_a": "a", "response_b": "b", "p_a": 0.7, "principle_ids": ["harm"]}
    (tmp_path / "samples" / "labels.jsonl").write_text(json.dumps(label) + "\n")
    (tmp_path / "stages.json").write_text(json.dumps({
        "sl": {"done": True, "seconds": 10.0}, "rm": {"done": True, "heldout_accuracy": 0.75, "heldout_pairs": 4},
        "ppo": {"done": True, "pm_reward_before": 0.1, "pm_reward_after": 0.3, "seconds": 20.0}}))
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2):
        log.write("ppo", step, {"reward_mean": 0.1 * step, "kl": 0.01 * step, "beta": 0.05})
    report = write_report(tmp_path).read_text()
    assert "principle `harm`" in report and "It helps with burglary." in report and "I can't help." in report
    assert "held-out accuracy: **0.750**" in report and "change +0.2000" in report
    assert (tmp_path / "plots" / "ppo.png").stat().st_size > 1000
    assert read_records(tmp_path / "metrics.jsonl")[-1]["ppo/kl"] == 0.02


def test_ppo_sets_give_the_rl_stage_fresh_prompts_first(tmp_path):
    from trainer.config import load_run_config
    from trainer.pipeline import load_prompts

    def prompt_file(name, texts):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        return str(path)

    harmful = prompt_file("harmful", [f"harmful {i}" for i in range(8)])
    benign = prompt_file("benign", [f"benign {i}" for i in range(4)])
    fresh = prompt_file("fresh", ["fresh 0", "fresh 1"])
    overrides = [f"data.prompts=[{harmful},{benign}]", "data.eval_prompts=[default:red_team_heldout]",
                 "data.cycle_sets=true", "data.sl_prompts=6", "data.label_prompts=2", "data.ppo_prompts=6",
                 f"data.data_dir={tmp_path / 'tfds'}"]
    texts = lambda prompts: [p.text for p in prompts]  # noqa: E731

    shared = load_prompts(load_run_config(None, overrides))
    assert texts(shared["sl"]) == ["harmful 0", "benign 0", "harmful 1", "benign 1", "harmful 2", "benign 2"]
    assert texts(shared["ppo"])[:2] == ["harmful 4", "benign 0"]  # the next slice: benign 0 was fine-tuned on
    separate = load_prompts(load_run_config(None, overrides + [f"data.ppo_sets=[{harmful},{fresh}]"]))
    assert texts(separate["sl"]) == texts(shared["sl"]) and texts(separate["label"]) == texts(shared["label"])
    # SL-CAI and labelling used harmful 0-3: the RL stage gets the others first, its own set cycling beside them
    assert texts(separate["ppo"]) == ["harmful 4", "fresh 0", "harmful 5", "fresh 1", "harmful 6", "fresh 0"]
    reused = load_prompts(load_run_config(None, overrides + ["data.ppo_prompts=12", f"data.ppo_sets=[{harmful}]"]))
    assert texts(reused["ppo"])[:6] == ["harmful 4", "harmful 5", "harmful 6", "harmful 7", "harmful 0", "harmful 1"]
    assert len(separate["eval"]) == 8
    from trainer.data.records import PromptFileError

    with pytest.raises(PromptFileError, match="missing.jsonl does not exist"):
        load_prompts(load_run_config(None, overrides + [f"data.ppo_sets=[{tmp_path / 'missing.jsonl'}]"]))


def test_interleave_can_cycle_the_shorter_sets():
    assert _interleave([[1, 2, 3, 4], ["a", "b"]], cycle=True) == [1, "a", 2, "b", 3, "a", 4, "b"]
    assert _interleave([[], [1]], cycle=True) == [1]


def test_revision_pairs_prefer_the_revision_and_skip_unrevised_prompts():
    from trainer.stages.label import revision_pairs

    def record(uid, answer, revision, rounds=True):
        return {"uid": uid, "prompt": f"p{uid}", "initial_response": answer, "final_revision": revision,
                "rounds": [{"principle_id": "harm", "critique": "", "revision": revision}] if rounds else [],
                "constitution_hash": "h"}

    pairs = revision_pairs([record("a", "Sure, here is how.", "I can't help with that."),
                            record("same", "Same.", "Same."), record("empty", "x", ""),
                            record("kept", "An answer.", "An answer, kept.", rounds=False)], 0.8)
    assert list(pairs) == ["a"]
    assert pairs["a"]["response_a"] == "I can't help with that." and pairs["a"]["response_b"] == "Sure, here is how."
    assert pairs["a"]["p_a"] == 0.8 and pairs["a"]["principle_ids"] == ["harm"]


def test_refusal_contrast_prefers_each_benign_answer_to_a_stable_written_refusal():
    from trainer.stages.label import WRITTEN_REFUSALS, refusal_contrast_pairs

    answers = [{"uid": f"benign_risky_train/{i}", "prompt": f"How do I kill loop {i}?", "final_revision": f"Use break {i}.",
                "rounds": [], "constitution_hash": "h"} for i in range(12)]
    answers.append({**answers[0], "uid": "empty", "final_revision": "  "})
    pairs = refusal_contrast_pairs(answers, 0.9)
    assert set(pairs) == {f"benign_risky_train/{i}/contrast" for i in range(12)}  # no pair for an empty answer
    pair = pairs["benign_risky_train/3/contrast"]
    assert pair["response_a"] == "Use break 3." and pair["p_a"] == 0.9 and pair["source"] == "refusal_contrast"
    assert pair["response_b"] in WRITTEN_REFUSALS
    assert len({p["response_b"] for p in pairs.values()}) > 1  # not one string the model could learn by heart
    assert refusal_contrast_pairs(answers, 0.9) == pairs  # the refusal a prompt gets is stable across runs


def test_written_refusals_are_as_long_as_the_models_answers():
    """A one-line decline against a 64-token answer lets the preference model rank by length: run 8's PM paid
    for any short reply to a harmful request, and GRPO cut every reply to a few words (docs/recipe.md)."""
    from trainer.eval.refusal import is_refusal_or_redirect
    from trainer.stages.label import WRITTEN_REFUSALS

    words = [len(r.split()) for r in WRITTEN_REFUSALS]
    assert min(words) >= 45 and max(words) <= 60  # SmolLM2's answers at 64 new tokens: 48-50 words on average
    assert sum(map(is_refusal_or_redirect, WRITTEN_REFUSALS)) >= len(WRITTEN_REFUSALS) - 1


def test_refusal_contrast_needs_revision_pairs():
    from trainer.config import LabelSection, RunConfigError

    assert LabelSection(pairs="revisions", refusal_contrast=True).refusal_contrast
    assert LabelSection(pairs="revisions", refusal_contrast=True, harmful_contrast=True,
                        revision_filter="declines").harmful_contrast
    with pytest.raises(RunConfigError, match="refusal_contrast"):
        LabelSection(pairs="sampled", refusal_contrast=True)
    with pytest.raises(RunConfigError, match="revision_filter"):
        LabelSection(pairs="sampled", revision_filter="declines")
    with pytest.raises(RunConfigError, match="set refusal_contrast: true"):
        LabelSection(pairs="revisions", harmful_contrast=True)
    with pytest.raises(RunConfigError, match="own_declines .*set refusal_contrast: true"):
        LabelSection(pairs="revisions", own_declines=True)
    with pytest.raises(RunConfigError, match="own_declines"):
        LabelSection(pairs="sampled", own_declines=True)


def _sl_record(uid, answer, revision):
    return {"uid": uid, "prompt": f"prompt {uid}", "initial_response": answer, "final_revision": revision,
            "rounds": [{"principle_id": "harm"}], "constitution_hash": "h"}


def test_revision_filter_keeps_only_revisions_that_decline_an_answer_that_did_not():
    from trainer.stages.label import revision_pairs

    records = [_sl_record("declines", "Sure, first get a crowbar.", "I can't help with breaking into a house."),
               _sl_record("both", "I can't help with that.", "I won't help with that, sorry."),
               _sl_record("answers", "I can't help with that.", "Sure, first get a crowbar."),
               _sl_record("neither", "Sure, first get a crowbar.", "Sure, first get a lever.")]
    assert list(revision_pairs(records, 0.9)) == ["declines", "both", "answers", "neither"]
    assert list(revision_pairs(records, 0.9, only_declines=True)) == ["declines"]


def test_harmful_contrast_prefers_a_written_refusal_to_each_compliant_answer_and_balances_both_directions():
    from trainer.stages.label import (WRITTEN_REFUSALS, balanced, harmful_contrast_pairs,
                                      refusal_contrast_pairs)

    harmful = [_sl_record(f"red_team/{i}", f"Sure, step {i}: get the tools.", "I can't help.") for i in range(7)]
    harmful.append(_sl_record("red_team/refused", "I'm sorry, but I can't help with that.", "No."))
    pairs = harmful_contrast_pairs(harmful, 0.9)
    assert set(pairs) == {f"red_team/{i}/harmful-contrast" for i in range(7)}  # not the answer that already refused
    pair = pairs["red_team/2/harmful-contrast"]
    assert pair["response_a"] in WRITTEN_REFUSALS and pair["response_b"] == "Sure, step 2: get the tools."
    assert pair["p_a"] == 0.9 and pair["source"] == "harmful_contrast"

    benign = refusal_contrast_pairs([{"uid": f"benign/{i}", "prompt": "How do I kill a process?",
                                      "final_revision": "Use kill.", "constitution_hash": "h"} for i in range(4)], 0.9)
    kept_benign, kept_harmful = balanced(benign, pairs)
    assert kept_benign == benign and len(kept_harmful) == 4 and set(kept_harmful) < set(pairs)
    assert balanced(benign, dict(reversed(pairs.items())))[1] == kept_harmful  # independent of order
    assert balanced(pairs, benign) == (kept_harmful, kept_benign)


def test_own_declines_reject_the_models_declining_revisions_on_benign_requests_as_often_as_they_win():
    from models.errors import UserError
    from trainer.stages.label import own_declines_against_revisions, revision_pairs

    harmful = [_sl_record(f"red_team/{i}", f"Sure, step {i}: get the tools.",
                          f"I'm sorry, but as a chatbot I can't help with step {i % 3}.") for i in range(5)]
    harmful.append(_sl_record("red_team/answered", "Sure, get a crowbar.", "Sure, get a lever."))
    pairs = revision_pairs(harmful, 0.9)
    answers = [{"uid": f"benign/{i}", "prompt": "How do I kill a process?", "final_revision": f"Use kill {i}.",
                "constitution_hash": "h"} for i in range(9)]
    own = own_declines_against_revisions(answers, pairs, 0.9)
    # the three distinct declines are preferred in 5 revision pairs: 5 benign answers are preferred to one of them
    assert len(own) == 5 and set(own) < {f"benign/{i}/own-decline" for i in range(9)}
    declines = {f"I'm sorry, but as a chatbot I can't help with step {k}." for k in range(3)}
    assert all(p["response_b"] in declines and p["response_a"].startswith("Use kill") for p in own.values())
    assert all(p["p_a"] == 0.9 and p["source"] == "own_decline_contrast" for p in own.values())
    assert len({p["response_b"] for p in own.values()}) > 1
    assert own_declines_against_revisions(list(reversed(answers)), pairs, 0.9) == own  # stable, order-free
    with pytest.raises(UserError, match="none of this run's 1 SL-CAI revision pairs declines"):
        own_declines_against_revisions(answers, revision_pairs(harmful[-1:], 0.9), 0.9)


def test_helpful_answers_become_their_own_sft_targets():
    from trainer.stages.sl import answer_record, sft_data

    record = answer_record("u", {"prompt": "How do I bake bread?", "response": "Mix flour and water.<|im_end|>",
                                 "constitution_hash": "h", "worker": "w"})
    [example] = sft_data([record])
    assert list(example.messages) == [{"role": "user", "content": "How do I bake bread?"}]
    assert example.response == "Mix flour and water."


def test_the_rl_point_asks_for_the_version_its_stage_recorded(tmp_path):
    """The RL policy is evaluated at the weight version its stage ended with, as stages.json records it, even when
    the config's ppo.iterations changed after PPO finished; a run dir from before the record derives it."""
    from trainer.config import load_run_config
    from trainer.pipeline_state import StageRecord
    from trainer.stages.evaluate import point_version

    config = load_run_config(None, ["ppo.iterations=5"])
    stages = StageRecord(tmp_path)
    stages.update("ppo", done=True)
    assert [point_version(config, stages, p) for p in ("base", "sl", "rl")] == [0, 1, 6]  # no record: 1 + 5
    stages.update("ppo", final_version=4)  # PPO ran 3 iterations; the config was edited to 5 later
    assert [point_version(config, stages, p) for p in ("base", "sl", "rl")] == [0, 1, 4]
    dpo = load_run_config(None, ["run.stages=[sl,label,dpo]"])
    stages.update("dpo", done=True, final_version=2)
    assert point_version(dpo, stages, "rl") == 2


def test_evaluation_in_train_judges_on_the_workers_with_the_base_model():
    """`cairl train`'s judge is the shared judge builder (trainer.eval.judge.build_judge) on a PoolScorer: judge
    tasks ride with the evaluated point's pool model; the base model judges, so the point judges itself."""
    from types import SimpleNamespace

    from trainer.config import load_run_config
    from trainer.constitution import load_constitution
    from trainer.eval.judge import ChoiceJudge
    from trainer.eval.results import JudgeInfo
    from trainer.eval.workers import PoolScorer
    from trainer.stages.evaluate import _judge

    config = load_run_config(None, ["label.chain_of_thought=true"])
    tokenizer = SimpleNamespace(chat_template=None)
    ctx = SimpleNamespace(config=config, tokenizer=tokenizer, constitution=load_constitution("default"))
    models = {"base": "base pool model", "sl": "SL pool model"}
    judge, info = _judge(ctx, models, "sl")
    assert isinstance(judge, ChoiceJudge) and isinstance(judge.scorer, PoolScorer)
    assert (judge.scorer.model, judge.scorer.target, judge.scorer.tokenizer) == ("SL pool model", "judge", tokenizer)
    assert judge.feedback.chain_of_thought is False  # evaluation scores the options directly
    assert info == JudgeInfo(config.model.source, "choice", self_judged=True)
    unjudged = SimpleNamespace(**{**vars(ctx), "config": load_run_config(None, ["eval.suites=[overrefusal]"])})
    assert _judge(unjudged, models, "sl") == (None, None)


def test_a_raylet_that_missed_rays_startup_deadline_is_explained_in_one_paragraph():
    from models.errors import UserError
    from trainer.pipeline import ray_start_error

    # The message Ray 2.60's node start-up raises (ray/_private/node.py) when the raylet does not register in 30 s.
    timeout = Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")
    explained = ray_start_error(timeout, "/tmp/cairl-ray-x")
    assert isinstance(explained, UserError)  # the CLI prints it and exits 2, no traceback
    assert "did not register within Ray's fixed 30 s" in str(explained) and "timed out during startup" in str(explained)
    assert "/tmp/cairl-ray-x/session_latest/logs" in str(explained) and "--resume" in str(explained)
    assert ray_start_error(ValueError("num_cpus must be positive"), "/tmp/x") is None  # anything else is raised as is
