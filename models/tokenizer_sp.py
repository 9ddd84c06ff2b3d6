"""Tokenizer backed by a sentencepiece model (tokenizer.model, as Llama 2 / Mistral ship).

sentencepiece segments ordinary text; around it we follow what `transformers`' LlamaTokenizer
does with the same tokenizer.model, so ids agree after an export:

- control pieces (<s>, </s>, <unk>, custom control symbols) and user-defined pieces written in the
  text are cut out first and become their single ids;
- the "▁" prefix that marks a word start is added once, to the text at the very start of the input,
  and only if it does not already start with a space (Metaspace prepend_scheme="first"); with
  `legacy=True` also to the text after each special token ("always"), with `add_prefix_space=False`
  never -- the two tokenizer_config.json keys transformers reads;
- decoding maps "▁" to a space, joins <0xNN> byte pieces into UTF-8, and drops one leading space.

transformers rebuilds a tokenizer.model as a BPE vocabulary and ignores the model's normalizer, so
only BPE models with whitespace-preserving normalization (normalization_rule_name="identity",
remove_extra_whitespaces=False, as Llama's) tokenize identically there; `save` warns about others.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from models.tokenizer_base import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

_PIECE = sp_pb2.ModelProto.SentencePiece
_BPE = sp_pb2.TrainerSpec.BPE
_WORD_START = "\u2581"  # "▁", sentencepiece's visible space


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus special tokens and chat template.

    Special tokens default to the model's own bos/eos/unk/pad pieces; pass token strings to override
    them (as tokenizer_config.json does).
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = True,
        model_max_length: int | None = None,
        extra_stop_ids: Sequence[int] = (),
        special_ids: Mapping[str, int | None] | None = None,
        legacy: bool = False,
        add_prefix_space: bool | None = None,
        source: str = "tokenizer.model",
    ):
        self._source = source
        self._proto_bytes = bytes(model_proto)
        proto = _parse_proto(self._proto_bytes, source)
        self._proto = proto
        self._sp = _processor(self._proto_bytes, source)
        # The same model without its automatic word-start prefix, for text after a special token.
        no_prefix = sp_pb2.ModelProto()
        no_prefix.CopyFrom(proto)
        no_prefix.normalizer_spec.add_dummy_prefix = False
        self._sp_no_prefix = _processor(no_prefix.SerializeToString(), source)
        # tokenizer_config.json's add_prefix_space / legacy, as transformers reads them: whether text gets the
        # word-start prefix at all, and whether again after every special token (legacy) or only at the start.
        self._add_prefix = proto.normalizer_spec.add_dummy_prefix if add_prefix_space is None else add_prefix_space
        self._legacy = legacy
        self._strips_spaces = proto.normalizer_spec.remove_extra_whitespaces

        self.vocab_size = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._types = [piece.type for piece in proto.pieces]
        self._ids = {piece: i for i, piece in reversed(list(enumerate(self._pieces)))}  # first id wins
        self._byte_ids = frozenset(i for i, t in enumerate(self._types) if t == _PIECE.BYTE)
        self._special_ids = frozenset(i for i, t in enumerate(self._types) if t in (_PIECE.CONTROL, _PIECE.UNKNOWN))

        def own(piece_id: int) -> str | None:
            return self._pieces[piece_id] if piece_id >= 0 else None

        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.model_max_length = model_max_length
        self._init_specials(
            source=source,
            tokens={"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token},
            special_ids=special_ids,
            defaults={
                "bos_token": own(self._sp.bos_id()),
                "eos_token": own(self._sp.eos_id()),
                "pad_token": own(self._sp.pad_id()),
                "unk_token": own(self._sp.unk_id()),
            },
            extra_stop_ids=extra_stop_ids,
        )
        # As transformers does, the declared bos/eos/unk/pad are special whatever their piece type.
        declared = {self.bos_id, self.eos_id, self.pad_id, self.unk_id} - {None}
        self._special_ids = self._special_ids | declared
        whole = [
            p
            for i, p in enumerate(self._pieces)
            if p and (i in self._special_ids or self._types[i] == _PIECE.USER_DEFINED)
        ]
        # Longest first, so '<|im_end|>' is not read as a shorter token that is its prefix.
        self._whole_re = (
            re.compile("|".join(re.escape(p) for p in sorted(whole, key=len, reverse=True))) if whole else None
        )

    @classmethod
    def from_file(cls, path: str | Path, **specials) -> "SentencePieceTokenizer":
        """Load a tokenizer.model; `specials` are the SentencePieceTokenizer keyword arguments."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read the sentencepiece model {path}: {e.strerror}") from None
        return cls(data, source=str(path), **specials)

    @property
    def model_proto(self) -> bytes:
        return self._proto_bytes

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        pos = 0
        for match in self._whole_re.finditer(text) if self._whole_re else ():
            ids += self._encode_plain(text[pos : match.start()], at_start=pos == 0)
            ids.append(self._ids[match.group()])
            pos = match.end()
        ids += self._encode_plain(text[pos:], at_start=pos == 0)
        return ids

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if not (self._add_prefix and (at_start or self._legacy)):
            return self._sp_no_prefix.encode(text)
        if self._strips_spaces:
            # Normalization would strip a space we add; sentencepiece's own prefix comes after normalization.
            return self._sp.encode(text)
        # transformers' Metaspace: text that already starts with a space gets no second one.
        return self._sp_no_prefix.encode(text if text.startswith(" ") else " " + text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        pending = bytearray()  # consecutive <0xNN> pieces form one UTF-8 sequence
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size or (skip_special_tokens and token_id in self._special_ids):
                continue
            if token_id in self._byte_ids:
                pending.append(int(self._pieces[token_id][3:5], 16))
                continue
            parts.append(_flush_bytes(pending))
            parts.append(self._pieces[token_id].replace(_WORD_START, " "))
        parts.append(_flush_bytes(pending))
        text = "".join(parts)
        if self._add_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        return self._pieces[token_id] if 0 <= token_id < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def _save_model_files(self, directory: Path) -> tuple[list[str], str]:
        spec = self._proto.normalizer_spec
        if (
            self._proto.trainer_spec.model_type != _BPE
            or spec.remove_extra_whitespaces
            or spec.name not in ("identity", "")
        ):
            log.warning(
                "%s: transformers reads tokenizer.model as a BPE vocabulary without the model's normalizer; "
                "this model (type %s, normalizer %r, remove_extra_whitespaces=%s) may tokenize differently there. "
                "Train with model_type='bpe', normalization_rule_name='identity', remove_extra_whitespaces=False "
                "for exact exports.",
                self._source,
                sp_pb2.TrainerSpec.ModelType.Name(self._proto.trainer_spec.model_type),
                spec.name,
                spec.remove_extra_whitespaces,
            )
        path = directory / "tokenizer.model"
        path.write_bytes(self._proto_bytes)
        return [str(path)], "LlamaTokenizer"

    def _extra_config(self) -> dict:
        # transformers builds its Metaspace rule from these two: "first" (legacy=False), "always", or "never".
        return {"legacy": self._legacy, "add_prefix_space": bool(self._add_prefix)}


def _flush_bytes(pending: bytearray) -> str:
    if not pending:
        return ""
    try:
        text = pending.decode("utf-8")
    except UnicodeDecodeError:
        text = "\ufffd" * len(pending)  # as tokenizers' ByteFallback: one replacement character per byte
    pending.clear()
    return text


def _parse_proto(data: bytes, source: str) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        proto.Clear()
    if not proto.pieces:
        raise TokenizerError(
            f"{source} is not a sentencepiece model (no vocabulary could be read from its {len(data)} bytes); "
            f"expected a tokenizer.model written by sentencepiece, the file may be truncated or corrupt"
        )
    return proto


def _processor(data: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"sentencepiece cannot load {source}: {e}") from None
    return processor
