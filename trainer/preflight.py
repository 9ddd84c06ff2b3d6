"""Checks a run makes before Ray or a JAX backend starts and before anything is written: the model sources
open (config, tokenizer, every tensor header) and every prompt fits the one prompt-length rule.

    tokenizer = check_model_source(config.model.source, "model.source")
    prompts = fit_prompts(prompts, tokenizer, config.data.max_prompt_tokens, config.data.long_prompts)

The prompt rule is decided here, once, for every stage: a prompt whose chat-rendered tokens exceed
data.max_prompt_tokens is cut to its last tokens (`truncate`, as PPO keeps the end of a long context) or
the run is refused naming it (`reject`). So no prompt can fail later on a worker in one stage and not in
another, and a resumed run decides exactly as the first one did.
"""

from __future__ import annotations

from models.errors import UserError
from trainer.data.records import Prompt


class PromptLengthError(UserError, ValueError):
    """Prompts longer than data.max_prompt_tokens with data.long_prompts: reject."""


def check_model_source(source: str, key: str):
    """Open `source` as the run's workers will (config, tokenizer, tensor headers; no tensor data read);
    returns its tokenizer. Anything that fails is a UserError naming `key` and the file."""
    from models import hf_io
    from models.sources import ModelSourceError, resolve
    from models.tokenizer import check_vocab_fits, load_tokenizer

    try:
        kind, path = resolve(source)
        if kind == "gguf":
            from models.gguf_io import config_from_gguf, open_reader
            from models.tokenizer import tokenizer_from_gguf

            reader = open_reader(path)  # parses every tensor's header against the file
            config = config_from_gguf(reader, str(path))
            tokenizer = tokenizer_from_gguf(reader, source=str(path))
        else:
            config, _ = hf_io.read_config(path)
            tokenizer = load_tokenizer(path)
            hf_io.check_weight_headers(path, config)
        check_vocab_fits(tokenizer, config.vocab_size, source=str(path))
    except UserError as err:
        raise ModelSourceError(f"{key} {source!r} cannot be used: {err}") from None
    except Exception as err:  # noqa: BLE001 - a library's own error on a damaged file: still the user's input
        raise ModelSourceError(f"{key} {source!r} cannot be opened ({type(err).__name__}: {err}); is the model "
                               f"directory complete? Download or export it again") from None
    return tokenizer


def fit_prompts(prompts: list[Prompt], tokenizer, max_tokens: int, rule: str) -> list[Prompt]:
    """`prompts` with the prompt-length rule applied (see the module docstring); uids never change."""
    from trainer.prompts import prompt_messages

    fitted, too_long = [], []
    for prompt in prompts:
        rendered = len(tokenizer.encode_chat(prompt_messages(prompt.text)))
        if rendered <= max_tokens:
            fitted.append(prompt)
        elif rule == "reject":
            too_long.append((prompt, rendered))
        else:
            fitted.append(Prompt(uid=prompt.uid, text=_keep_end(prompt.text, tokenizer, max_tokens),
                                 source=prompt.source))
    if too_long:
        shown = "; ".join(f"{p.uid} from {p.source} ({n} tokens)" for p, n in too_long[:5])
        raise PromptLengthError(
            f"{len(too_long)} prompts are longer than data.max_prompt_tokens = {max_tokens} chat tokens: {shown}. "
            f"Remove them, raise data.max_prompt_tokens, or set data.long_prompts: truncate to keep their end")
    return fitted


def _keep_end(text: str, tokenizer, max_tokens: int) -> str:
    """The longest end of `text` whose chat rendering has at most `max_tokens` tokens."""
    from trainer.prompts import prompt_messages

    ids = tokenizer.encode(text)
    keep = len(ids)
    while keep > 0:
        tail = tokenizer.decode(ids[-keep:]).strip()
        rendered = len(tokenizer.encode_chat(prompt_messages(tail))) if tail else max_tokens + 1
        if tail and rendered <= max_tokens:
            return tail
        keep -= max(1, rendered - max_tokens)
    raise PromptLengthError(f"data.max_prompt_tokens = {max_tokens} leaves no room for a prompt after the chat "
                            f"template's own tokens; raise it")
