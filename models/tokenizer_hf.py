"""Tokenizer backed by a Hugging Face `tokenizers.Tokenizer` (the tokenizer.json format).

Used for tokenizer.json directories and for GGUF files, whose vocabulary we rebuild as one of these
(models/tokenizer_gguf.py). Saving writes tokenizer.json unchanged plus a tokenizer_config.json that
declares `PreTrainedTokenizerFast`, which makes transformers use our tokenizer.json verbatim instead of
rebuilding a pipeline of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tokenizers

from models.tokenizer_base import Tokenizer, TokenizerError


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special tokens and chat template from the model's config files."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        model_max_length: int | None = None,
        extra_stop_ids: Sequence[int] = (),
        special_ids: Mapping[str, int | None] | None = None,
        source: str = "tokenizer.json",
    ):
        self._backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._special_ids = self._added_special_ids()
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._init_specials(
            source=source,
            tokens={"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token},
            special_ids=special_ids,
            extra_stop_ids=extra_stop_ids,
        )
        self._register_declared_specials()
        self.add_bos_token = self._post_processor_adds_bos() if add_bos_token is None else add_bos_token

    def _added_special_ids(self) -> frozenset[int]:
        return frozenset(i for i, added in self._backend.get_added_tokens_decoder().items() if added.special)

    def _register_declared_specials(self) -> None:
        # transformers makes the config's bos/eos/unk/pad special even when tokenizer.json lists them as plain
        # vocabulary: matched whole in text and skipped by decode. Do the same, on a copy of the caller's backend.
        missing = [
            token_id
            for token_id in dict.fromkeys((self.bos_id, self.eos_id, self.pad_id, self.unk_id))
            if token_id is not None and token_id not in self._special_ids
        ]
        if not missing:
            return
        self._backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        self._backend.add_special_tokens(
            [tokenizers.AddedToken(self.id_to_token(i), special=True, normalized=False) for i in missing]
        )
        self._special_ids = self._added_special_ids()

    @classmethod
    def from_file(cls, path: str | Path, **specials) -> "HFTokenizer":
        """Load tokenizer.json at `path`; `specials` are the HFTokenizer keyword arguments."""
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for both bad JSON and bad structure
            raise TokenizerError(
                f"cannot read the tokenizer file {path}: {str(e)[:300]}. Expected a tokenizer.json written by the "
                f"Hugging Face tokenizers library; the file may be truncated or corrupt"
            ) from None
        return cls(backend, source=str(path), **specials)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def _post_processor_adds_bos(self) -> bool:
        # Llama-3 style tokenizer.json files state "add BOS" only through their TemplateProcessing.
        if self.bos_id is None:
            return False
        ids = self._backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def _save_model_files(self, directory: Path) -> tuple[list[str], str]:
        path = directory / "tokenizer.json"
        self._backend.save(str(path))
        return [str(path)], "PreTrainedTokenizerFast"
