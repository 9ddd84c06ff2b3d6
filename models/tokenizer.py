"""Tokenizers behind one interface, and loading them from what models ship.

    tok = load_tokenizer("path/to/hf_model_dir")      # tokenizer.json (preferred) or tokenizer.model
    tok = load_tokenizer("model.gguf")                # vocabulary rebuilt from GGUF metadata
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    tok.save(out_dir)                                 # files transformers.AutoTokenizer loads

Special tokens come from tokenizer_config.json, then special_tokens_map.json, then the ids in
generation_config.json / config.json. generation_config.json's eos_token_id list adds stop ids.
The chat template comes from chat_template.jinja, else tokenizer_config.json's chat_template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models.chat_template import PLAIN_CHAT_TEMPLATE, ChatTemplateError
from models.tokenizer_base import (
    END_OF_TURN_TOKENS,
    SPECIAL_TOKEN_KEYS,
    Tokenizer,
    TokenizerError,
    VocabTooLargeError,
    check_vocab_fits,
)
from models.tokenizer_gguf import tokenizer_from_gguf
from models.tokenizer_hf import HFTokenizer
from models.tokenizer_sp import SentencePieceTokenizer

__all__ = [
    "END_OF_TURN_TOKENS",
    "PLAIN_CHAT_TEMPLATE",
    "ChatTemplateError",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "VocabTooLargeError",
    "check_vocab_fits",
    "load_tokenizer",
    "tokenizer_from_gguf",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory or a .gguf file.

    `path` may also be a tokenizer.json / tokenizer.model file, read with the config files beside it.
    """
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path)
    if path.is_file() and path.name in TOKENIZER_FILES:
        directory, preferred = path.parent, path
    elif path.is_dir():
        directory = path
        preferred = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
        if preferred is None:
            present = sorted(p.name for p in path.iterdir())[:20]
            raise TokenizerError(
                f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model there "
                f"(found: {', '.join(present) or 'nothing'})"
            )
    else:
        raise TokenizerError(
            f"{path} does not exist or is not a model directory, tokenizer.json, tokenizer.model or .gguf file"
        )

    specials = _specials_from_configs(directory)
    if preferred.name == "tokenizer.json":
        return HFTokenizer.from_file(preferred, **specials)
    config = _read_json(directory / "tokenizer_config.json")
    prefix_options = {key: bool(config[key]) for key in ("legacy", "add_prefix_space") if config.get(key) is not None}
    return SentencePieceTokenizer.from_file(preferred, **specials, **prefix_options)


def _load_gguf(path: Path) -> Tokenizer:
    import gguf  # imported here: opening the package is slow and only GGUF sources need it

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on truncated files
        raise TokenizerError(f"cannot read the GGUF file {path}: {e}. The file may be truncated or corrupt") from None
    return tokenizer_from_gguf(reader, source=str(path))


def _specials_from_configs(directory: Path) -> dict[str, Any]:
    """Keyword arguments for a tokenizer class, from the config files in `directory`."""
    config = _read_json(directory / "tokenizer_config.json")
    token_map = _read_json(directory / "special_tokens_map.json")
    generation = _read_json(directory / "generation_config.json")
    model_config = _read_json(directory / "config.json")

    out: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_KEYS:
        token = _token_string(config.get(key, token_map.get(key)), directory / "tokenizer_config.json", key)
        if token is not None:
            out[key] = token

    # Ids (not strings) in generation_config / config.json: resolved to strings later, against the vocabulary.
    out["special_ids"] = {
        key: _first_id(generation.get(f"{key}_id", model_config.get(f"{key}_id"))) for key in SPECIAL_TOKEN_KEYS
    }
    eos_ids = generation.get("eos_token_id", model_config.get("eos_token_id"))
    out["extra_stop_ids"] = [int(i) for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]) if i is not None]

    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        out["chat_template"] = template_file.read_text(encoding="utf-8")
    elif config.get("chat_template") is not None:
        out["chat_template"] = _pick_template(config["chat_template"], directory / "tokenizer_config.json")
    if "add_bos_token" in config:
        out["add_bos_token"] = bool(config["add_bos_token"])
    max_length = config.get("model_max_length")
    if isinstance(max_length, int) and max_length < 10**12:  # transformers writes 1e30 for "unbounded"
        out["model_max_length"] = max_length
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); expected the JSON file transformers writes") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} holds a JSON {type(value).__name__}; expected a JSON object")
    return value


def _token_string(value: Any, path: Path, key: str) -> str | None:
    """A special token as a string; transformers writes them as strings or as AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {key} is {value!r}; expected a token string or {{'content': token}}")


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else None


def _pick_template(value: Any, path: Path) -> str:
    # Some models ship several named templates; "default" is the one apply_chat_template uses.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{path}: chat_template must be a string or a list with a 'default' entry, got {value!r:.200}")
