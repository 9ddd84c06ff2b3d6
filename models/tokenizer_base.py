"""The one tokenizer interface the rest of cairl uses, and what all implementations share.

Conventions, chosen to match `transformers` so exports behave the same there:
- `encode(text)` never adds BOS/EOS unless asked (`add_bos=True`); special-token strings that appear
  in the text (e.g. "<|im_end|>" written by a chat template) become their single ids.
- `decode(ids)` drops special tokens by default.
- `encode_chat` tokenizes the rendered template as is: templates that want BOS write it themselves,
  exactly as `apply_chat_template` does.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from models.chat_template import PLAIN_CHAT_TEMPLATE, render_chat_template
from models.errors import UserError

# Tokens that end an assistant turn in common chat formats. They count as stop ids only when the
# vocabulary has them as special tokens, so ordinary text can never stop generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (SmolLM, Qwen)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end_of_text|>",  # Llama 3 base
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
    "<|endoftext|>",  # GPT-2 family, SmolLM, Qwen
    "</s>",  # Llama 2, Mistral
)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(UserError, ValueError):
    """Tokenizer files that are missing, unreadable, or inconsistent with each other or the model."""


class VocabTooLargeError(TokenizerError):
    """The tokenizer can produce ids that the model's embedding table has no row for."""


def check_vocab_fits(tokenizer: "Tokenizer", num_embeddings: int, *, source: str = "the model") -> None:
    """Raise VocabTooLargeError unless every id the tokenizer can emit indexes a row of the embedding.

    An embedding larger than the vocabulary is fine (models pad it to a multiple of 64 or 128).
    """
    if tokenizer.vocab_size > num_embeddings:
        raise VocabTooLargeError(
            f"the tokenizer of {source} has {tokenizer.vocab_size} tokens (ids 0..{tokenizer.vocab_size - 1}) but "
            f"the embedding has only {num_embeddings} rows, so ids >= {num_embeddings} would index past it. "
            f"Expected a tokenizer from the same model, or an embedding resized to at least {tokenizer.vocab_size}."
        )


class Tokenizer(abc.ABC):
    """Text <-> ids, special ids, and chat rendering, for one model.

    Attributes set by every implementation:
      vocab_size: total number of ids, added/special tokens included (max id + 1).
      bos_id / eos_id / pad_id / unk_id: special ids (bos and unk may be None; pad falls back to eos).
      stop_ids: ids that end a reply: eos, the model's end-of-turn tokens, generation_config's eos ids.
      chat_template: the model's Jinja template, or None (then PLAIN_CHAT_TEMPLATE is used).
      add_bos_token: whether the model expects BOS in front of plain text (tokenizer_config's add_bos_token).
      model_max_length: the context length the tokenizer declares, when known.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    unk_id: int | None
    stop_ids: tuple[int, ...]
    chat_template: str | None
    add_bos_token: bool
    model_max_length: int | None

    # -- implemented per backend -------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it map to their ids. BOS first if `add_bos`."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out when `skip_special_tokens`."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (e.g. 'Ġthe', '▁the', '<|im_end|>'), None if out of range."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, None if the vocabulary lacks it."""

    @abc.abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) token, which decode skips and chat formats use."""

    @abc.abstractmethod
    def _save_model_files(self, directory: Path) -> tuple[list[str], str]:
        """Write the vocabulary file(s); return their paths and the transformers tokenizer_class to declare."""

    # -- shared ------------------------------------------------------------------------------------
    def _init_specials(
        self,
        *,
        source: str,
        tokens: Mapping[str, str | None],
        special_ids: Mapping[str, int | None] | None = None,
        defaults: Mapping[str, str | None] | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        """Resolve the special tokens; call from the subclass __init__ once the vocabulary is loaded.

        For each of bos/eos/pad/unk the first that is set wins: `tokens[key]` (a string, from tokenizer_config),
        `special_ids[key]` (an id, from generation_config.json / config.json), `defaults[key]` (the backend's own).
        """
        special_ids, defaults = special_ids or {}, defaults or {}
        resolved = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = tokens.get(key)
            if token is None and special_ids.get(key) is not None:
                token = self.id_to_token(special_ids[key])
                if token is None:
                    raise TokenizerError(
                        f"{source}: {key}_id {special_ids[key]} is outside the vocabulary of {self.vocab_size} tokens"
                    )
            resolved[key] = token if token is not None else defaults.get(key)
        self.bos_id = self._require_id(resolved["bos_token"], "bos_token", source)
        if resolved["eos_token"] is None:
            raise TokenizerError(
                f"{source} names no eos_token; expected 'eos_token' in tokenizer_config.json (or eos_token_id in "
                f"generation_config.json / config.json) so generation knows where a reply ends"
            )
        self.eos_id = self._require_id(resolved["eos_token"], "eos_token", source)
        pad_id = self._require_id(resolved["pad_token"], "pad_token", source)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.unk_id = self._require_id(resolved["unk_token"], "unk_token", source)
        stops = [self.eos_id]
        for token_id in extra_stop_ids:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(
                    f"{source}: stop token id {token_id} (eos_token_id in generation_config.json) is outside the "
                    f"vocabulary of {self.vocab_size} tokens"
                )
            stops.append(token_id)
        for token in END_OF_TURN_TOKENS:
            token_id = self.token_to_id(token)
            if token_id is not None and self.is_special(token_id):
                stops.append(token_id)
        self.stop_ids = tuple(dict.fromkeys(stops))  # ordered, without repeats

    def _require_id(self, token: str | None, key: str, source: str) -> int | None:
        if token is None:
            return None
        token_id = self.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{source}: {key} {token!r} is not in the tokenizer's vocabulary; expected one of its tokens "
                f"(tokenizer_config.json / special_tokens_map.json name the special tokens)"
            )
        return token_id

    def special_tokens_map(self) -> dict[str, str]:
        """{'bos_token': ..., 'eos_token': ..., ...} for the specials this tokenizer defines."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {key: self.id_to_token(token_id) for key, token_id in ids.items() if token_id is not None}

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (PLAIN_CHAT_TEMPLATE without one)."""
        return render_chat_template(
            self.chat_template or PLAIN_CHAT_TEMPLATE,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map(),
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of `render_chat(...)`; the template, not this method, decides whether BOS comes first."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write files `transformers.AutoTokenizer.from_pretrained(directory)` loads; return their paths.

        The chat template is always written (PLAIN_CHAT_TEMPLATE when the model had none), so an export
        renders conversations in transformers exactly as cairl trained on them.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TokenizerError(f"cannot create the tokenizer directory {directory}: {e.strerror}") from None
        try:
            written, tokenizer_class = self._save_model_files(directory)
            specials = self.special_tokens_map()
            config: dict[str, Any] = {
                "tokenizer_class": tokenizer_class,
                # null, not absent: an absent key makes transformers fall back to its class defaults ("<s>").
                **{key: specials.get(key) for key in SPECIAL_TOKEN_KEYS},
                "add_bos_token": self.add_bos_token,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": self.chat_template or PLAIN_CHAT_TEMPLATE,
                **self._extra_config(),
            }
            if self.model_max_length is not None:
                config["model_max_length"] = self.model_max_length
            written.append(_write_json(directory / "tokenizer_config.json", config))
            written.append(_write_json(directory / "special_tokens_map.json", specials))
        except OSError as e:
            raise TokenizerError(f"cannot write the tokenizer to {directory}: {e}") from None
        return written

    def _extra_config(self) -> dict[str, Any]:
        """Backend-specific tokenizer_config.json keys."""
        return {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, stop_ids={self.stop_ids}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def _write_json(path: Path, obj: Any) -> str:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)
