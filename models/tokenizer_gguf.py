"""Rebuild a model's tokenizer from GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF has no tokenizer.json: it stores the vocabulary, merges, token types and special ids as
metadata. We turn those into a `tokenizers.Tokenizer` with the pipeline the original model used:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. How text is split into words before BPE depends
  on the model and is named by `tokenizer.ggml.pre` (see `_PRE_TOKENIZERS`).
- `tokenizer.ggml.model == "llama"`: a sentencepiece BPE vocabulary with scores; we derive the merges
  from the scores and use byte fallback, as Llama 2's tokenizer.json does.

Token types follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control tokens become special added tokens (matched whole in text, skipped by decode), user-defined
ones plain added tokens (matched whole, kept by decode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from models.tokenizer_base import TokenizerError
from models.tokenizer_hf import HFTokenizer

log = logging.getLogger(__name__)

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Word-splitting rules by `tokenizer.ggml.pre`, each as the model's own tokenizer.json has it.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_words() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _single_digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # SmolLM / StarCoder: every digit is its own word, then GPT-2's rules.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_words,
    "gpt-2": _gpt2_words,
    "gpt2": _gpt2_words,
    "smollm": _single_digits_then_gpt2,
    "starcoder": _single_digits_then_gpt2,
    "refact": _single_digits_then_gpt2,
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": _split_then_bytes(_LLAMA3_SPLIT),
    "smaug-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}
# Llama 3's tokenizer.json looks whole words up in the vocabulary before merging (ignore_merges).
_IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}


def tokenizer_from_gguf(reader: Any, source: str | None = None) -> HFTokenizer:
    """The tokenizer described by an open `gguf.GGUFReader`'s metadata.

    `source` names the file in error messages (default: the reader's path).
    """
    source = source or str(getattr(getattr(reader, "data", None), "filename", None) or "the GGUF file")
    meta = _Metadata(reader, source)
    kind = meta.require("tokenizer.ggml.model")
    tokens = meta.require("tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise TokenizerError(
            f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens; "
            f"expected one type per token"
        )

    def token_at(key: str) -> str | None:
        token_id = meta.get(key)
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise TokenizerError(f"{source}: {key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
        return tokens[int(token_id)]

    bos = token_at("tokenizer.ggml.bos_token_id")
    unk = token_at("tokenizer.ggml.unknown_token_id")
    if kind == "gpt2":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        backend = _byte_level_bpe(tokens, meta.require("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"))
    elif kind == "llama":
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        scores = meta.require("tokenizer.ggml.scores")
        backend = _sentencepiece_bpe(
            tokens, scores, token_types, unk, meta.get("tokenizer.ggml.add_space_prefix", True)
        )
    else:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {kind!r}; cairl reads 'gpt2' (byte-level BPE) and 'llama' "
            f"(sentencepiece BPE) tokenizers from GGUF files"
        )
    _add_special_tokens(backend, tokens, token_types, unk)
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(meta.get("tokenizer.ggml.bos_token_id")))]
        )
    elif kind == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    extra_stops = [
        int(meta.get(key))
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if meta.get(key) is not None
    ]
    architecture = meta.get("general.architecture")
    context = meta.get(f"{architecture}.context_length") if architecture else None
    return HFTokenizer(
        backend,
        bos_token=bos,
        eos_token=token_at("tokenizer.ggml.eos_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id"),
        unk_token=unk,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
        model_max_length=int(context) if context is not None else None,
        extra_stop_ids=extra_stops,
        source=source,
    )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Backend:
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"GGUF merge {i} is {merge!r}; expected two tokens separated by one space")
        pairs.append((left, right))
    vocab = {token: i for i, token in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    pre = pre or "default"
    if pre not in _PRE_TOKENIZERS:
        log.warning(
            "GGUF tokenizer.ggml.pre %r is not known to cairl; splitting words with GPT-2's rules, which may "
            "tokenize some text (digits, punctuation runs) differently from the original model. Known: %s",
            pre,
            ", ".join(sorted(_PRE_TOKENIZERS)),
        )
    backend = Backend(
        models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES)
    )
    backend.pre_tokenizer = _PRE_TOKENIZERS.get(pre, _gpt2_words)()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], token_types: list[int], unk: str | None, add_space_prefix: bool
) -> Backend:
    vocab = {token: i for i, token in reversed(list(enumerate(tokens)))}
    backend = Backend(
        models.BPE(
            vocab, merges_from_scores(tokens, scores, token_types), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece BPE vocabulary.

    sentencepiece BPE scores each merged token by when it was learned (higher = earlier), so a merge
    (left, right) -> left+right ranks by the score of left+right. Every split of a normal token into two
    vocabulary tokens is a candidate; ties break by the ids of the two halves.
    """
    ids = {token: i for i, token in reversed(list(enumerate(tokens)))}
    ranked = []
    for i, token in enumerate(tokens):
        if token_types[i] != 1 or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(backend: Backend, tokens: list[str], token_types: list[int], unk: str | None) -> None:
    special = [
        t for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL or (kind == _UNKNOWN and t == unk)
    ]
    plain = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special if t])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain if t])


class _Metadata:
    """Typed access to a reader's fields, with errors that name the key and the file."""

    def __init__(self, reader: Any, source: str):
        self._fields = reader.fields
        self._source = source

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # gguf raises assorted errors for truncated or mistyped fields
            raise TokenizerError(f"{self._source}: cannot read metadata {key}: {e}") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise TokenizerError(
                f"{self._source} has no {key} metadata; expected a GGUF written by llama.cpp's converter, which "
                f"stores the tokenizer under tokenizer.ggml.*"
            )
        return value
