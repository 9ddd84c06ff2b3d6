"""The RL-CAI learner: PPO on the policy and a value model, against the frozen SL policy (reference)
and the frozen preference model (reward).

All four models are built from weights already on the devices when the earlier stages ran in this
process (`LearnerContext.handoff`): the reference *is* the SL policy's parameter arrays and the
preference model the rm stage's; the policy and value train states hold copies (their steps donate).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from trainer.learners.base import StageLearner, pad_rows
from trainer.learners.requests import Metrics, Rollout, StageStart


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


class PPOLearner(StageLearner):
    stage = "ppo"

    def setup(self) -> StageStart:
        from trainer.ppo import abstract_ppo_state, create_ppo_state, make_ppo_step, make_token_fn

        ctx, cfg, seed = self.ctx, self.config.ppo, self.config.run.seed
        llama, scalar = ctx.llama_factory(), ctx.scalar_factory()
        reference, reward_model = self._frozen_models()
        restored = self.ckpt.restore(abstract_ppo_state(ctx.abstract_state(llama, cfg.policy_optimizer, seed),
                                                        ctx.abstract_state(scalar, cfg.value_optimizer, seed + 1)))
        if restored is not None:
            self.state, extras = restored
        else:
            policy = ctx.train_state(llama, reference, cfg.policy_optimizer, seed)
            value_init = reward_model if cfg.value_from == "reward_model" else ctx.scalar_params_from(reference)
            value = ctx.train_state(scalar, value_init, cfg.value_optimizer, seed + 1)
            self.state, extras = create_ppo_state(policy, value, cfg.update.kl), {}
        self._step_fn = make_ppo_step(self.state, cfg.update, ctx.rules)
        self._values_fn = make_token_fn(self.state.value, ctx.rules, "values")
        return StageStart(step=self.step(), extras=extras)

    def _frozen_models(self) -> tuple[nnx.State, nnx.State]:
        """The frozen reference (the policy entering the stage) and preference model, with their jitted
        per-token log-probs and sequence scores; returns (reference, reward model) parameters."""
        from trainer.steps import sequence_scores, token_logprobs_and_entropy

        ctx = self.ctx
        self._reference, self._reward_model = ctx.policy_params(), ctx.reward_model_params()
        llama_graph, scalar_graph = ctx.graphdef(ctx.llama_factory()), ctx.graphdef(ctx.scalar_factory())
        self._reference_logprobs = jax.jit(
            lambda p, t, m: token_logprobs_and_entropy(nnx.merge(llama_graph, p), t, m)[0])
        self._scores = jax.jit(lambda p, t, m: sequence_scores(nnx.merge(scalar_graph, p), t, m))
        return self._reference, self._reward_model

    def step(self) -> int:
        return int(self.state.policy.step)

    def finish(self) -> None:
        """The RL policy saved alone in checkpoints/ppo-params (what `cairl eval RUN:rl` reads) and handed on."""
        self.ctx.hand_on("policy", self.stage, self.state.policy)

    def policy_params(self) -> nnx.State:
        return self.state.policy.params

    def _sequence_arrays(self, prompt_ids, response_ids):
        """Right-padded prompt+response rows of one fixed length (one compile), and the response mask.
        Prompts keep their last data.max_prompt_tokens tokens, as the rollout workers sampled them."""
        max_prompt = self.config.data.max_prompt_tokens
        length = _round_up(max_prompt + max(self.config.ppo.max_new_tokens, self.config.ppo.eval_max_new_tokens))
        rows, response_masks, offsets = [], [], []
        for p, r in zip(prompt_ids, response_ids):
            p = list(p)[-max_prompt:]
            rows.append(p + list(r))
            offsets.append(len(p))
            response_masks.append([0] * len(p) + [1] * len(r))
        tokens, attention = pad_rows(rows, length, self.ctx.tokenizer.pad_id)
        response_mask = np.zeros_like(attention)
        for i, m in enumerate(response_masks):
            response_mask[i, : len(m)] = m[:length]
        return tokens, attention, response_mask, offsets

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """Preference-model score of each (prompt, response)."""
        tokens, attention, _, _ = self._sequence_arrays(prompt_ids, response_ids)
        return [float(s) for s in jax.device_get(self._scores(self._reward_model, tokens, attention))]

    def train_step(self, batch: list[Rollout] | None = None) -> Metrics:
        """One PPO iteration's learner side: scores, reference log-probs, values, then the update."""
        t0 = time.perf_counter()
        update = self._rollout_batch(batch or [])
        values = jax.device_get(self._values_fn(self.state.value, update["tokens_BxT"], update["attention_mask_BxT"]))
        update["old_values_BxT"] = np.asarray(values, np.float32)
        return self._update(update, time.perf_counter() - t0)

    def _rollout_batch(self, rollouts: list[Rollout]) -> dict[str, np.ndarray]:
        """The rollouts as rows with their behaviour and reference log-probs and preference-model scores."""
        tokens, attention, response_mask, offsets = self._sequence_arrays(
            [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
        old_logprobs = np.zeros(tokens.shape, np.float32)
        for i, (r, off) in enumerate(zip(rollouts, offsets)):
            lp = np.asarray(r.logprobs, np.float32)[: tokens.shape[1] - off]
            old_logprobs[i, off: off + len(lp)] = lp
        scores = jax.device_get(self._scores(self._reward_model, tokens, attention))
        ref = jax.device_get(self._reference_logprobs(self._reference, tokens, attention))
        return {"tokens_BxT": tokens, "attention_mask_BxT": attention, "response_mask_BxT": response_mask,
                "old_logprobs_BxT": old_logprobs, "ref_logprobs_BxT": np.asarray(ref, np.float32),
                "scores_B": np.asarray(scores, np.float32)}

    def _update(self, update: dict[str, np.ndarray], score_seconds: float) -> Metrics:
        """The jitted update on `update`, its metrics on the host with timings and the reward statistics."""
        scores = update["scores_B"]
        t1 = time.perf_counter()
        self.state, metrics = self._step_fn(self.state, update)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update(score_seconds=score_seconds, update_seconds=time.perf_counter() - t1,
                       reward_mean=float(np.mean(scores)), reward_std=float(np.std(scores)),
                       scores=[float(s) for s in scores])
        return metrics
