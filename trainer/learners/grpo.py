"""The RL-CAI learner without a value model: GRPO or RLOO (trainer/grpo.py) on groups of responses,
against the frozen SL policy (reference) and the frozen preference model (reward).

It is the `ppo` stage's learner when `ppo.algorithm` is grpo or rloo: the same stage, checkpoints
(checkpoints/ppo, ppo-params) and driver loop, so evaluation and export need nothing new. What it
shares with PPO's learner — the frozen models, row layout, preference-model scores, the update's
bookkeeping, the policy handed on — is inherited.
"""

from __future__ import annotations

import time

from trainer.learners.ppo import PPOLearner
from trainer.learners.requests import Metrics, Rollout, StageStart


class GroupLearner(PPOLearner):
    stage = "ppo"

    def setup(self) -> StageStart:
        from trainer.grpo import GroupState, make_group_step

        ctx, cfg, seed = self.ctx, self.config.ppo, self.config.run.seed
        llama = ctx.llama_factory()
        reference, _ = self._frozen_models()
        restored = self.ckpt.restore(GroupState(policy=ctx.abstract_state(llama, cfg.policy_optimizer, seed)))
        if restored is not None:
            self.state, extras = restored
        else:
            self.state, extras = GroupState(policy=ctx.train_state(llama, reference, cfg.policy_optimizer, seed)), {}
        self._step_fn = make_group_step(self.state, cfg.algorithm, cfg.group, cfg.max_new_tokens, ctx.rules)
        return StageStart(step=self.step(), extras=extras)

    def train_step(self, batch: list[Rollout] | None = None) -> Metrics:
        """One iteration's learner side: scores and reference log-probs of every response (groups of
        ppo.group.group_size consecutive rollouts), then the group-relative update."""
        t0 = time.perf_counter()
        update = self._rollout_batch(batch or [])
        return self._update(update, time.perf_counter() - t0)
