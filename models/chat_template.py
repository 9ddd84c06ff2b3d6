"""Chat templates: render a conversation to the text a chat model was trained on.

Templates are Jinja2 programs shipped with models (tokenizer_config.json, GGUF metadata). They are
untrusted, so they run in Jinja's immutable sandbox, bounded in time and size: a render stops with a
ChatTemplateError after RENDER_SECONDS or MAX_RENDER_CHARS of output. The clock is checked at every
output chunk, function call (`range` included), attribute and item access and arithmetic operator, which
is everything a template loop can do; `*`, `+` and `**` are refused before they build an oversized value.
The environment mirrors the one `transformers` gives `apply_chat_template`, so a model renders
byte-for-byte the same text here and there:

- `trim_blocks` and `lstrip_blocks` on, `loopcontrols` (`{% break %}`, `{% continue %}`) enabled;
- `{% generation %}...{% endgeneration %}` accepted (it marks assistant text for loss masks in
  transformers; here it renders its body unchanged);
- `tojson` that does not HTML-escape and keeps non-ASCII text, `raise_exception(msg)`,
  `strftime_now(fmt)`;
- variables: `messages`, `tools`, `documents`, `add_generation_prompt`, and the special tokens
  (`bos_token`, `eos_token`, `unk_token`, `pad_token`) as strings.

Models without a template get `PLAIN_CHAT_TEMPLATE`, BOS then a plain "User:/Assistant:" format whose
assistant turns end with the EOS token, so generation has a token to stop on.
"""

from __future__ import annotations

import datetime
import functools
import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import UserError

# Used when a model ships no template. It starts with BOS (empty when the model has none), as plain text
# encoded with add_bos would. Assistant turns end with eos so that SFT on this format teaches the
# model to stop; the generation prompt "Assistant:" has no trailing space because the reply's first word
# carries its own leading space in BPE/sentencepiece vocabularies.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


RENDER_SECONDS = 5.0  # a real template renders a conversation in well under a millisecond
MAX_RENDER_CHARS = 4_000_000  # far beyond any context window; a template must not fill memory


class ChatTemplateError(UserError, ValueError):
    """A chat template that does not compile or that rejects the conversation (raise_exception)."""


class _Budget(threading.local):
    deadline: float = float("inf")


_budget = _Budget()


def _check_clock() -> None:
    if time.monotonic() > _budget.deadline:
        raise ChatTemplateError(f"the chat template ran longer than {RENDER_SECONDS:g} s; a chat template must "
                                f"render a conversation at once (a hostile or broken template?)")


def _too_big(kind: str, size: int) -> ChatTemplateError:
    return ChatTemplateError(f"the chat template builds a {kind} of {size} items, more than {MAX_RENDER_CHARS}; "
                             f"refused (a hostile or broken template?)")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a clock check on every operation a loop can make, and no huge values."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call(self, context, obj, *args, **kwargs):
        _check_clock()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_clock()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_clock()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        _check_clock()
        sized = (str, bytes, list, tuple)
        if operator == "*" and isinstance(left, int) != isinstance(right, int):
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, sized) and len(seq) * max(times, 0) > MAX_RENDER_CHARS:
                raise _too_big(type(seq).__name__, len(seq) * times)
        if operator == "**" and isinstance(right, int) and abs(right) > 4096:
            raise ChatTemplateError(f"the chat template raises to the power {right}; refused")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, sized) and len(result) > MAX_RENDER_CHARS:
            raise _too_big(type(result).__name__, len(result))
        return result


class _GenerationBlock(jinja2.ext.Extension):
    """Parses `{% generation %}body{% endgeneration %}` and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes '<' and '&', which would corrupt tool schemas in the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """Jinja's namespace() refusing underscore attribute names, which lead to Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 -- Jinja's signature trick, so namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the underscore attribute {name!r}")


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` in the sandbox; cached because a run renders thousands of conversations."""
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template does not compile: {e.message} (template line {e.lineno}: "
            f"{_line(template, e.lineno)!r}). Expected a Jinja2 chat template as transformers uses."
        ) from None


def _line(text: str, lineno: int | None) -> str:
    lines = text.splitlines()
    return lines[lineno - 1] if lineno and 0 < lineno <= len(lines) else ""


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the conversation's shape and drop keys whose value is None (as transformers does).

    Every message must be a mapping with a string `role`; `content` is a string or a list of parts.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError(
            f"a conversation must be a non-empty list of messages like {{'role': 'user', 'content': '...'}}, "
            f"got {messages!r:.200}"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(
                f"message {i} of the conversation must be a dict with a string 'role' and a 'content', "
                f"got {message!r:.200}"
            )
        out.append({key: value for key, value in message.items() if value is not None})
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    **variables: Any,
) -> str:
    """Render `messages` with `template`, exposing `special_tokens` (e.g. {'bos_token': '<s>'}) and `variables`.

    Errors raised by the template itself (`raise_exception`, a missing key) become ChatTemplateError.
    """
    compiled = compile_chat_template(template)
    context = {"tools": None, "documents": None, **special_tokens, **variables}
    messages = normalize_messages(messages)
    _budget.deadline = time.monotonic() + RENDER_SECONDS
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **context):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise ChatTemplateError(f"the chat template's output passed {MAX_RENDER_CHARS} characters; refused "
                                        f"(a hostile or broken template?)")
            _check_clock()
            chunks.append(chunk)
        return "".join(chunks)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an unsafe operation: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from None
    except (MemoryError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template exhausted the renderer ({type(e).__name__}); refused") from None
    finally:
        _budget.deadline = float("inf")
