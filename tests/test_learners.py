"""The learner actor's body without Ray, on a tiny model: sl → label → rm → ppo in one process hands the
weights on on the devices (no checkpoint read back), and a new process restores them from checkpoints."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from trainer.config import load_run_config
from trainer.critique import SFTExample
from trainer.learners import StageCallError
from trainer.learners.requests import PreferenceData, PreferencePair, Rollout
from trainer.pipeline_state import StageRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.slow  # compiles SFT, RM and PPO steps: about a minute on 2 cores


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from pipeline_fixtures import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _config(model_dir, runs_dir):
    return load_run_config(ROOT / "configs" / "tiny.yaml", [f"model.source={model_dir}", f"run.runs_dir={runs_dir}",
                                                            "ppo.batch_size=2"])


PAIRS = tuple(PreferencePair(f"question {i}", "a kind safe answer", "a rude harmful answer", 0.8) for i in range(3))


def _leaves(params):
    return jax.tree.leaves(params)


def test_stages_hand_weights_on_on_device_then_resume_restores_them(tiny_model, tmp_path):
    from trainer.learner import Learner

    config = _config(tiny_model, tmp_path)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True)
    learner = Learner(config, str(run_dir))
    record = StageRecord(run_dir)

    assert learner.setup("sl").step == 0
    assert learner.set_data([SFTExample("u0", ({"role": "user", "content": "hi"},), "hello there")]) == 1
    metrics = learner.train_step()
    assert metrics["step"] == 1 and metrics["skipped"] == 0 and metrics["nonfinite_streak"] == 0
    with pytest.raises(StageCallError, match="sl stage's learner has no score"):
        learner.score([[1]], [[2]])
    learner.finish()
    sl_policy = learner.ctx.handoff["policy"]
    learner.close()
    record.update("sl", done=True)

    def no_restore(*args):
        raise AssertionError("a stage read back weights this process already holds")

    learner.ctx.restore_params = no_restore
    learner.setup("label")
    assert learner._policy_params() is sl_policy

    learner.setup("rm")
    learner.set_data(PreferenceData(train=PAIRS[:2], heldout=PAIRS[2:]))
    before = learner.evaluate()
    assert before["accuracy"] == 0.5 and before["pairs"] == 1  # the zero head ties every pair: a coin flip
    assert learner.train_step()["skipped"] == 0
    after = learner.evaluate()
    assert learner.evaluate(PAIRS[2:]) == after  # given pairs are scored as the held-out ones are
    assert learner.evaluate(PAIRS)["pairs"] == 3
    learner.finish()
    reward_model = learner.ctx.handoff["reward_model"]
    record.update("rm", done=True)

    learner.setup("ppo")
    ppo = learner.current
    assert ppo._reference is sl_policy and ppo._reward_model is reward_model
    # The policy starts from SL's weights, as a copy: PPO steps donate their state, the reference stays.
    for a, b in zip(_leaves(ppo.state.policy.params), _leaves(sl_policy)):
        assert a is not b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rollouts = [Rollout((1, 2, 3), (4, 5), (-1.0, -2.0)), Rollout((3, 2), (6,), (-0.5,))]
    # A reply cut at max_new_tokens is scored as the preference model was trained: ended with EOS.
    eos = ppo.ctx.tokenizer.eos_id
    cut, ended = learner.score([[1, 2, 3], [1, 2, 3]], [[4, 5], [4, 5, eos]])
    assert cut == pytest.approx(ended, abs=1e-6)
    assert learner.score([[1, 2, 3]], [[4]])[0] != pytest.approx(ended, abs=1e-6)  # the score does read the reply
    metrics = learner.train_step(rollouts)
    assert metrics["skipped"] == 0 and metrics["nonfinite_streak"] == 0 and len(metrics["scores"]) == 2
    assert metrics["scores"] == pytest.approx(learner.score([r.prompt_ids for r in rollouts],
                                                            [r.response_ids for r in rollouts]), abs=1e-6)
    assert all(not leaf.is_deleted() for leaf in _leaves(sl_policy))
    learner.save(1, {"iteration": 1}, force=True)
    trained = [np.asarray(x) for x in _leaves(ppo.state.policy.params)]
    learner.close()

    # A new process: nothing on the devices, so the stages' weights come back from checkpoints.
    resumed = Learner(config, str(run_dir))
    start = resumed.setup("ppo")
    assert start.step == 1 and start.extras == {"iteration": 1}
    for a, b in zip(_leaves(resumed.current._reference), _leaves(sl_policy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(_leaves(resumed.current.state.policy.params), trained):
        np.testing.assert_array_equal(np.asarray(a), b)
    resumed.close()


def test_dpo_learner_resumes_bit_identically_from_its_checkpoint(tiny_model, tmp_path):
    """DPO in one process for 3 steps, against 2 steps, a checkpoint, and a new learner that restores it (and
    recomputes the reference log-probs from the saved SL weights) for the third: the same parameters."""
    from trainer.learner import Learner

    pairs = PreferenceData(train=PAIRS[:2] + (PreferencePair("q", "short", "a much longer answer", 0.3),),
                           heldout=PAIRS[2:])

    def start(runs_dir, fresh):
        config = _config(tiny_model, runs_dir)
        if fresh:  # an SL stage that saved its policy, as the dpo stage's reference
            config.run_dir.mkdir(parents=True)
            learner = Learner(config, str(config.run_dir))
            learner.setup("sl")
            learner.set_data([SFTExample("u0", ({"role": "user", "content": "hi"},), "hello there")])
            learner.train_step()
            learner.finish()
            StageRecord(config.run_dir).update("sl", done=True)
            learner.close()
        learner = Learner(config, str(config.run_dir))  # a new process: the reference read back from sl-params
        step = learner.setup("dpo").step
        learner.set_data(pairs)
        return learner, step

    straight, step = start(tmp_path / "a", fresh=True)
    assert step == 0
    before = straight.evaluate()
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0  # the policy is its reference: every pair a tie
    logged = [straight.train_step() for _ in range(3)]
    assert [m["step"] for m in logged] == [1, 2, 3] and all(m["skipped"] == 0 for m in logged)
    assert {"accuracy", "margin", "chosen_logprob", "rejected_logprob"} <= logged[0].keys()

    first, _ = start(tmp_path / "b", fresh=True)
    for _ in range(2):
        first.train_step()
    assert first.save(2, {}, True)
    first.close()
    resumed, step = start(tmp_path / "b", fresh=False)
    assert step == 2
    resumed.train_step()
    for a, b in zip(_leaves(straight.current.policy_params()), _leaves(resumed.current.policy_params()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed.finish()
    assert (resumed.ctx.run_dir / "checkpoints" / "dpo-params" / "3").is_dir()  # the run's RL policy, for eval/export
