"""A policy on one host: model, tokenizer and sampler, with the text helpers every task needs.

    policy = Policy.load("smollm2-135m-instruct")
    ids = policy.chat_ids("How do I bake bread?")                      # chat-rendered prompt tokens
    texts, n_tokens = policy.respond(["How do I ...?"], 64, temperature=0.0, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

from models.generation import Sampler, SamplingParams
from models.sources import load
from models.tokenizer import Tokenizer


class Policy:
    def __init__(self, model, tokenizer: Tokenizer, config):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.sampler = Sampler(model, tokenizer.stop_ids, tokenizer.pad_id)

    @classmethod
    def load(cls, source: str, dtype: str = "float32") -> "Policy":
        loaded = load(source, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, loaded.config)

    def chat_ids(self, text: str) -> list[int]:
        from trainer.prompts import prompt_messages

        return self.tokenizer.encode_chat(prompt_messages(text), add_generation_prompt=True)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
                  top_p: float = 1.0) -> tuple[list[str], int]:
        samples = self.sampler.generate(
            prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p), seed=seed)
        texts = [self.tokenizer.decode(samples.tokens[i, : samples.lengths[i]].tolist()).strip()
                 for i in range(len(prompts))]
        return texts, int(samples.lengths.sum())

    def respond(self, user_texts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                top_p: float = 1.0) -> tuple[list[str], int]:
        """The assistant's reply to each user message (chat template applied)."""
        return self._generate([self.chat_ids(t) for t in user_texts], max_new_tokens, temperature, seed, top_p)
