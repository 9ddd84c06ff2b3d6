"""The SL-CAI learner: supervised fine-tuning of the policy on the final revisions (masked token NLL)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from trainer.critique import SFTExample
from trainer.learners.base import SupervisedLearner, pad_rows
from trainer.learners.requests import StageStart


class SFTLearner(SupervisedLearner):
    stage = "sl"

    def setup(self) -> StageStart:
        from trainer.steps import make_sft_step

        self.batch_size = self.config.sl.batch_size
        start = self.restore_or(self.ctx.llama_factory(), self.config.sl.optimizer, self.ctx.policy_params)
        self._step_fn = make_sft_step(self.state, self.ctx.rules)
        return start

    def set_data(self, data: list[SFTExample]) -> int:
        """Prompt and reply tokens in fixed-length rows, the loss on the reply (and its end-of-turn) only."""
        tokenizer, length = self.ctx.tokenizer, self.config.sl.max_seq_len
        rows, masks = [], []
        for example in data:
            prompt_ids = tokenizer.encode_chat(list(example.messages))
            reply_ids = tokenizer.encode(example.response) + [tokenizer.eos_id]
            rows.append((prompt_ids + reply_ids)[:length])
            masks.append(([0] * len(prompt_ids) + [1] * len(reply_ids))[:length])
        tokens, attention = pad_rows(rows, length, tokenizer.pad_id)
        loss = np.zeros_like(attention)
        for i, m in enumerate(masks):
            loss[i, : len(m)] = m
        self.data = {"tokens_BxT": tokens, "attention_mask_BxT": attention, "loss_mask_BxT": loss}
        return len(rows)

    def policy_params(self) -> nnx.State:
        return self.state.full_params()

    def finish(self) -> None:
        """The SL policy handed on; with LoRA also its adapters in PEFT's layout, on the initial model
        (SL always starts from it), whose resolved directory the adapter names as its base."""
        self.ctx.hand_on("policy", self.stage, self.state)
        if self.ctx.lora is not None:
            self.ctx.write_adapter(self.stage, self.state, base_model=self.ctx.initial_model_path())
