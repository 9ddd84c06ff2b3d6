"""The preference-model learner: a scalar-head LM (the initial model as backbone) trained with
Bradley–Terry on the soft AI labels, evaluated on held-out pairs."""

from __future__ import annotations

import numpy as np

from trainer.learners.base import PairLearner, pad_rows
from trainer.learners.requests import Metrics, PreferencePair, StageStart


class RMLearner(PairLearner):
    stage = "rm"

    def setup(self) -> StageStart:
        from trainer.steps import make_rm_eval, make_rm_step

        self.batch_size = self.config.rm.batch_size
        ctx = self.ctx
        start = self.restore_or(ctx.scalar_factory(), self.config.rm.optimizer,
                                lambda: ctx.scalar_params_from(ctx.initial_params()))
        self._step_fn = make_rm_step(self.state, ctx.rules)
        self._eval_fn = make_rm_eval(self.state, ctx.rules)
        return start

    def _eval_metrics(self, sums: list[dict]) -> Metrics:
        """Held-out accuracy, Bradley–Terry loss and score margin (trainer.steps.make_rm_eval)."""
        from trainer.steps import rm_eval_metrics

        return rm_eval_metrics(sums)

    def _pair_arrays(self, pairs: tuple[PreferencePair, ...]) -> dict[str, np.ndarray]:
        """Chat-rendered prompt + each response + end of turn, right-padded to rm.max_seq_len."""
        from trainer.prompts import prompt_messages

        tokenizer, length = self.ctx.tokenizer, self.config.rm.max_seq_len
        chosen, rejected = [], []
        for pair in pairs:
            prompt_ids = tokenizer.encode_chat(prompt_messages(pair.prompt))
            chosen.append(prompt_ids + tokenizer.encode(pair.response_a) + [tokenizer.eos_id])
            rejected.append(prompt_ids + tokenizer.encode(pair.response_b) + [tokenizer.eos_id])
        ct, cm = pad_rows(chosen, length, tokenizer.pad_id)
        rt, rm = pad_rows(rejected, length, tokenizer.pad_id)
        return {"chosen_tokens_BxT": ct, "chosen_mask_BxT": cm, "rejected_tokens_BxT": rt, "rejected_mask_BxT": rm,
                "p_chosen_B": np.asarray([p.p_a for p in pairs], np.float32)}

    def finish(self) -> None:
        self.ctx.hand_on("reward_model", self.stage, self.state)
