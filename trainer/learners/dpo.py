"""The DPO learner: the policy trained on the AI preference pairs directly (DPO or IPO, trainer/dpo.py),
against the policy it started from (SL's, frozen) as reference.

The reference's sequence log-probs of every pair are computed once, when the data arrives, and ride
in the batches: the reference takes no part in the updates. A resumed run recomputes them from the
same SL weights (checkpoints/sl-params), so they are the same numbers.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from trainer.learners.base import PairLearner, pad_rows
from trainer.learners.requests import Metrics, PreferencePair, StageStart


class DPOLearner(PairLearner):
    stage = "dpo"

    def setup(self) -> StageStart:
        from trainer.dpo import make_dpo_eval, make_dpo_step, make_sequence_logprob_fn

        cfg, ctx = self.config.dpo, self.ctx
        self.batch_size = cfg.batch_size
        start = self.restore_or(ctx.llama_factory(), cfg.optimizer, ctx.policy_params)
        self._step_fn = make_dpo_step(self.state, cfg, ctx.rules)
        self._eval_fn = make_dpo_eval(self.state, cfg, ctx.rules)
        self._reference_fn = make_sequence_logprob_fn(ctx.graphdef(ctx.llama_factory()), ctx.rules)
        return start

    def _eval_metrics(self, sums: list[dict]) -> Metrics:
        """Held-out implicit-reward accuracy, loss, margin and log-probs (trainer.dpo.make_dpo_eval)."""
        from trainer.dpo import dpo_eval_metrics

        return dpo_eval_metrics(sums)

    def _pair_arrays(self, pairs: tuple[PreferencePair, ...]) -> dict[str, np.ndarray]:
        """Chat-rendered prompt + each response + end of turn, right-padded to dpo.max_seq_len; the loss mask
        covers the response and its end of turn; the reference's sequence log-prob of each side."""
        from trainer.dpo import reference_logprobs
        from trainer.prompts import prompt_messages

        tokenizer, length = self.ctx.tokenizer, self.config.dpo.max_seq_len
        arrays = {"p_chosen_B": np.asarray([p.p_a for p in pairs], np.float32)}
        for side, responses in (("chosen", [p.response_a for p in pairs]), ("rejected", [p.response_b for p in pairs])):
            rows, loss_rows = [], []
            for pair, response in zip(pairs, responses):
                prompt_ids = tokenizer.encode_chat(prompt_messages(pair.prompt))
                reply_ids = tokenizer.encode(response) + [tokenizer.eos_id]
                rows.append(prompt_ids + reply_ids)
                loss_rows.append([0] * len(prompt_ids) + [1] * len(reply_ids))
            tokens, attention = pad_rows(rows, length, tokenizer.pad_id)
            loss_mask, _ = pad_rows(loss_rows, length, 0)
            arrays.update({f"{side}_tokens_BxT": tokens, f"{side}_mask_BxT": attention,
                           f"{side}_loss_mask_BxT": loss_mask})
            arrays[f"ref_{side}_B"] = reference_logprobs(self._reference_fn, self.ctx.policy_params(), tokens, attention,
                                                         loss_mask, self.batch_size, self.ctx.rules)
        return arrays

    def policy_params(self) -> nnx.State:
        return self.state.params

    def finish(self) -> None:
        """The DPO policy saved alone in checkpoints/dpo-params (the run's RL policy) and handed on."""
        self.ctx.hand_on("policy", self.stage, self.state)
