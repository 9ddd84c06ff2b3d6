"""The RL-CAI learner without a value model: GRPO or RLOO (trainer/grpo.py) on groups of responses,
against the frozen SL policy (reference) and the frozen preference model (reward).

It is the `ppo` stage's learner when `ppo.algorithm` is grpo or rloo: the same stage, checkpoints
(checkpoints/ppo, ppo-params) and driver loop, so evaluation and export need nothing new. What it
shares with PPO's learner — row layout, preference-model scores, the policy handed on — is inherited.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from trainer.learners.ppo import PPOLearner
from trainer.learners.requests import Metrics, Rollout, StageStart


class GroupLearner(PPOLearner):
    stage = "ppo"

    def setup(self) -> StageStart:
        from trainer.grpo import GroupState, make_group_step
        from trainer.steps import sequence_scores, token_logprobs_and_entropy

        ctx, cfg, seed = self.ctx, self.config.ppo, self.config.run.seed
        llama, scalar = ctx.llama_factory(), ctx.scalar_factory()
        reference, reward_model = ctx.policy_params(), ctx.reward_model_params()
        restored = self.ckpt.restore(GroupState(policy=ctx.abstract_state(llama, cfg.policy_optimizer, seed)))
        if restored is not None:
            self.state, extras = restored
        else:
            self.state, extras = GroupState(policy=ctx.train_state(llama, reference, cfg.policy_optimizer, seed)), {}
        self._step_fn = make_group_step(self.state, cfg.algorithm, cfg.group, cfg.max_new_tokens, ctx.rules)
        llama_graph, scalar_graph = ctx.graphdef(llama), ctx.graphdef(scalar)
        self._reference, self._reward_model = reference, reward_model
        self._reference_logprobs = jax.jit(
            lambda p, t, m: token_logprobs_and_entropy(nnx.merge(llama_graph, p), t, m)[0])
        self._scores = jax.jit(lambda p, t, m: sequence_scores(nnx.merge(scalar_graph, p), t, m))
        return StageStart(step=self.step(), extras=extras)

    def train_step(self, batch: list[Rollout] | None = None) -> Metrics:
        """One iteration's learner side: scores and reference log-probs of every response (groups of
        ppo.group.group_size consecutive rollouts), then the group-relative update."""
        rollouts = batch or []
        t0 = time.perf_counter()
        tokens, attention, response_mask, offsets = self._sequence_arrays(
            [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
        old_logprobs = np.zeros(tokens.shape, np.float32)
        for i, (r, off) in enumerate(zip(rollouts, offsets)):
            lp = np.asarray(r.logprobs, np.float32)[: tokens.shape[1] - off]
            old_logprobs[i, off: off + len(lp)] = lp
        scores = jax.device_get(self._scores(self._reward_model, tokens, attention))
        ref = jax.device_get(self._reference_logprobs(self._reference, tokens, attention))
        score_seconds = time.perf_counter() - t0
        update = {"tokens_BxT": tokens, "attention_mask_BxT": attention, "response_mask_BxT": response_mask,
                  "old_logprobs_BxT": old_logprobs, "ref_logprobs_BxT": np.asarray(ref, np.float32),
                  "scores_B": np.asarray(scores, np.float32)}
        t1 = time.perf_counter()
        self.state, metrics = self._step_fn(self.state, update)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update(score_seconds=score_seconds, update_seconds=time.perf_counter() - t1,
                       reward_mean=float(np.mean(scores)), reward_std=float(np.std(scores)),
                       scores=[float(s) for s in scores])
        return metrics
