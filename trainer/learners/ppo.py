"""The RL-CAI learner: PPO on the policy and a value model, against the frozen SL policy (reference)
and the frozen preference model (reward).

All four models are built from weights already on the devices when the earlier stages ran in this
process (`LearnerContext.handoff`): the reference *is* the SL policy's parameter arrays and the
preference model the rm stage's; the policy and value train states hold copies (their steps donate).
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from flax import nnx

from trainer.distributed import gather_to_host, put_batch
from trainer.learners.base import StageLearner, pad_rows
from trainer.pipeline_state import StageRecord
from trainer.learners.requests import Metrics, Rollout, StageStart
from trainer.mesh import batch_shards

log = logging.getLogger(__name__)


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
        from trainer.ppo import make_frozen_fns

        ctx = self.ctx
        self._reference, self._reward_model = ctx.policy_params(), ctx.reward_model_params()
        self._reference_logprobs, self._scores = make_frozen_fns(ctx.graphdef(ctx.llama_factory()),
                                                                 ctx.graphdef(ctx.scalar_factory()))
        return self._reference, self._reward_model

    def step(self) -> int:
        return int(self.state.policy.step)

    def finish(self) -> None:
        """The RL policy saved alone in checkpoints/ppo-params (what `cairl eval RUN:rl` reads) and handed on;
        with LoRA also its adapters in PEFT's layout, stacked on SL's when PPO trained on SL's weights, so
        that the adapter goes on the initial model either way."""
        self.ctx.hand_on("policy", self.stage, self.state.policy)
        if self.ctx.lora is None:
            return
        if not StageRecord(self.ctx.run_dir).done("sl"):  # PPO trained on the initial model itself
            self.ctx.write_adapter(self.stage, self.state.policy, base_model=self.ctx.initial_model_path())
        elif (self.ctx.run_dir / "adapters" / "sl" / "adapter_config.json").is_file():
            self.ctx.write_adapter(self.stage, self.state.policy, base_model=self.ctx.initial_model_path(),
                                   stacked_on="sl")
        else:
            log.warning("the sl stage left no LoRA adapter (it ran without model.lora), so the PPO adapter, which "
                        "goes on SL's weights, is not written; the merged RL policy is in checkpoints/ppo-params")

    def policy_params(self) -> nnx.State:
        return self.state.policy.full_params()

    def _sequence_arrays(self, prompt_ids, response_ids, ended: bool = False):
        """Right-padded prompt+response rows of one fixed length (one compile), and the response mask.
        Prompts keep their last data.max_prompt_tokens tokens, as the rollout workers sampled them. `ended`:
        room for the EOS a reply cut at max_new_tokens is scored with (_scored_replies)."""
        max_prompt = self.config.data.max_prompt_tokens
        length = _round_up(max_prompt + max(self.config.ppo.max_new_tokens, self.config.ppo.eval_max_new_tokens)
                           + int(ended))
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
        """Preference-model score of each (prompt, response), the response ended as in _scored_replies."""
        tokens, attention, _, _ = self._sequence_arrays(prompt_ids, self._scored_replies(response_ids), ended=True)
        return [float(s) for s in self._host(self._scores, self._reward_model, tokens, attention)]

    def _scored_replies(self, response_ids) -> list[list[int]]:
        """Each reply as the preference model saw replies in training: ending with EOS. A reply cut at
        ppo.max_new_tokens gets one appended, for scoring only (the policy's rows keep what was sampled).
        Read at a mid-sentence token instead, the score is off the PM's training distribution: on cut replies
        run 10's PM scored declining a benign request above answering it, on the same replies ended it scored
        it far below (docs/recipe.md)."""
        eos = self.ctx.tokenizer.eos_id
        return [list(r) if len(r) and r[-1] == eos else list(r) + [eos] for r in response_ids]

    def _host(self, fn, params, tokens, attention):
        """`fn(params, tokens, attention)` per row on the mesh, the result back on every host. With several
        processes the rows become global arrays split over the batch shards, so any count of rows is padded
        to a multiple of them (repeating the last row) and the padding dropped from the result."""
        n = len(tokens)
        extra = -n % batch_shards(self.ctx.rules) if jax.process_count() > 1 else 0
        if extra:
            tokens, attention = (np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in (tokens, attention))
        rows = put_batch({"tokens": tokens, "attention": attention}, self.ctx.rules)
        return gather_to_host(fn(params, rows["tokens"], rows["attention"]))[:n]

    def train_step(self, batch: list[Rollout] | None = None) -> Metrics:
        """One PPO iteration's learner side: scores, reference log-probs, values, then the update."""
        t0 = time.perf_counter()
        update = self._rollout_batch(batch or [])
        values = self._host(self._values_fn, self.state.value, update["tokens_BxT"], update["attention_mask_BxT"])
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
        scores = self.score([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
        ref = self._host(self._reference_logprobs, self._reference, tokens, attention)
        return {"tokens_BxT": tokens, "attention_mask_BxT": attention, "response_mask_BxT": response_mask,
                "old_logprobs_BxT": old_logprobs, "ref_logprobs_BxT": np.asarray(ref, np.float32),
                "scores_B": np.asarray(scores, np.float32)}

    def _update(self, update: dict[str, np.ndarray], score_seconds: float) -> Metrics:
        """The jitted update on `update`, its metrics on the host with timings and the reward statistics."""
        scores = update["scores_B"]
        t1 = time.perf_counter()
        self.state, metrics = self._step_fn(self.state, put_batch(update, self.ctx.rules))
        metrics = {k: float(v) for k, v in gather_to_host(metrics).items()}
        metrics.update(score_seconds=score_seconds, update_seconds=time.perf_counter() - t1,
                       reward_mean=float(np.mean(scores)), reward_std=float(np.std(scores)),
                       scores=[float(s) for s in scores])
        return metrics
