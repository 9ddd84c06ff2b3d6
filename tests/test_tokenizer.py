"""Tokenizers: our encode/decode/chat rendering against transformers on the same files.

Fast tests build small tokenizers here (a sentencepiece model trained on text this file writes, a
byte-level BPE trained with `tokenizers`) and check that what `save()` writes loads in transformers
with identical ids and chat rendering. `real_model` tests compare the tokenizer we rebuild from the
SmolLM2-135M-Instruct GGUF with transformers' own GGUF loader.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from models.chat_template import PLAIN_CHAT_TEMPLATE, ChatTemplateError, render_chat_template
from models.errors import UserError
from models.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    VocabTooLargeError,
    check_vocab_fits,
    load_tokenizer,
    tokenizer_from_gguf,
)

transformers = pytest.importorskip("transformers")

# Multilingual, emoji (incl. a ZWJ sequence and a skin tone), runs of whitespace, code, digits, and
# special-token strings written into the text.
TEST_STRING = (
    "Hello, world! Ça va? Grüße aus Köln. 日本語のテキスト、中文文本。 Русский текст, العربية, हिन्दी.\n"
    "Emoji: 🙂👍🏽 👨‍👩‍👧 🇫🇷 ✨\n\n\t  tabs\tand   multiple    spaces  \r\n"
    "def f(x: int) -> int:\n    return x ** 2  # 12345 + 3.14159 = 1e-9\n"
    '    if (a && b) { return "quoted"; }\n'
    "<|im_start|>user\nhi<|im_end|>\n  trailing   "
)
SAMPLE_TEXTS = [
    TEST_STRING,
    "Hello world",
    " leading space",
    "  two leading spaces",
    "two  inner  spaces",
    "trailing ",
    "\nstarts with a newline",
    "x",
    "",
    " ",
    "   ",
    "2024-11-27 12:34:56",
    "<|im_start|>assistant\n",
    "text<|im_end|>more text",
    "a <|im_end|> b",
    "unknown chars: 漢 ẞ ŉ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "And the next one? 🙂"},
    ],
    [
        {"role": "user", "content": "Write code:\n```python\nprint('hi')\n```"},
        {"role": "assistant", "content": "  Sure —\n\tdone.  "},
    ],
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(seed: int = 0, lines: int = 1500) -> str:
    """A few KB of varied text: English words, accented and non-Latin words, digits, code, punctuation."""
    rng = random.Random(seed)
    words = (
        "the a of to and in is that it for on with as be this by are was from at or an have not which "
        "constitution harmless helpful honest assistant answer question model reward policy train "
        "café naïve über straße Köln déjà vu 日本 中文 русский текст مرحبا नमस्ते "
        "def return print import class self lambda None True False x y z"
    ).split()
    symbols = [",", ".", "!", "?", ":", ";", "(", ")", "{", "}", "=", "+", "-", "*", "#", "'", '"', "🙂", "✨"]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(words))
            elif r < 0.9:
                parts.append(str(rng.randint(0, 99999)))
            else:
                parts.append(rng.choice(symbols))
        indent = "    " * rng.randint(0, 2) if rng.random() < 0.2 else ""
        out.append(indent + " ".join(parts))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# sentencepiece


@pytest.fixture(scope="module")
def sp_model_proto(tmp_path_factory) -> bytes:
    """A Llama-style sentencepiece BPE model (byte fallback, whitespace kept) trained on _corpus()."""
    work = tmp_path_factory.mktemp("sp")
    (work / "corpus.txt").write_text(_corpus(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"),
        model_prefix=str(work / "m"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        control_symbols=["<|eot|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return (work / "m.model").read_bytes()


@pytest.fixture(scope="module")
def sp_tok(sp_model_proto) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_model_proto)


def test_sentencepiece_specials_come_from_the_model(sp_tok):
    assert sp_tok.vocab_size == 600
    assert (sp_tok.unk_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, 2)
    assert sp_tok.pad_id == sp_tok.eos_id  # no pad piece: pad falls back to eos
    eot = sp_tok.token_to_id("<|eot|>")
    assert sp_tok.stop_ids[0] == 2 and eot not in sp_tok.stop_ids  # <|eot|> is not a known end-of-turn token
    assert sp_tok.is_special(eot) and not sp_tok.is_special(sp_tok.token_to_id("<|im_end|>"))
    assert sp_tok.add_bos_token


def test_sentencepiece_segments_with_the_model(sp_model_proto, sp_tok):
    """Text without special tokens or a leading space is segmented exactly as sentencepiece does."""
    processor = spm.SentencePieceProcessor(model_proto=sp_model_proto)
    for text in ["Hello world", "the constitution is helpful 12345", "日本 café\n    def f(x)", "trailing  "]:
        assert sp_tok.encode(text) == processor.encode(text)
    assert sp_tok.encode("hi", add_bos=True) == [1, *processor.encode("hi")]


def test_sentencepiece_special_strings_map_to_single_ids(sp_tok):
    im_start, im_end, eot = (sp_tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|eot|>"))
    ids = sp_tok.encode("<|im_start|>user\nhi<|im_end|><|eot|></s>")
    assert ids[0] == im_start and im_end in ids and eot in ids and ids[-1] == sp_tok.eos_id
    assert sp_tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"  # control tokens skipped, user-defined kept
    assert sp_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|><|eot|></s>"


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_sentencepiece_decode_inverts_encode(sp_tok, text):
    # Byte fallback makes every string representable. As in transformers, a text that starts with a space
    # gets no extra word-start prefix, and decode drops one leading space, so that one space is lost.
    expected = text[1:] if text.startswith(" ") else text
    assert sp_tok.decode(sp_tok.encode(text)) == expected


@pytest.mark.parametrize(
    "prefix_options",
    [{}, {"legacy": True}, {"add_prefix_space": False}],
    ids=["prefix-first", "prefix-always-legacy", "prefix-never"],
)
def test_sentencepiece_save_loads_in_transformers_with_identical_ids(sp_model_proto, prefix_options, tmp_path):
    sp_tok = SentencePieceTokenizer(sp_model_proto, **prefix_options)
    written = sp_tok.save(tmp_path)
    assert sorted(Path(p).name for p in written) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(ref).__name__ == "LlamaTokenizer"
    assert len(ref) == sp_tok.vocab_size
    for text in SAMPLE_TEXTS:
        ids = sp_tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert sp_tok.encode(text, add_bos=True) == ref.encode(text), text
        assert sp_tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert sp_tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    for messages in CONVERSATIONS:
        for gen in (True, False):
            rendered = sp_tok.render_chat(messages, add_generation_prompt=gen)
            assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert sp_tok.encode_chat(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, return_dict=False
            )
    again = load_tokenizer(tmp_path)  # reads legacy / add_prefix_space back from tokenizer_config.json
    assert [again.encode(t) for t in SAMPLE_TEXTS] == [sp_tok.encode(t) for t in SAMPLE_TEXTS]


def test_sentencepiece_prefix_modes(sp_model_proto):
    """Where the word-start prefix goes: input start only (default), after every special token too (legacy), never."""
    first, always, never = (
        SentencePieceTokenizer(sp_model_proto, **options)
        for options in ({}, {"legacy": True}, {"add_prefix_space": False})
    )
    with_prefix, without = first.encode("user"), never.encode("user")
    assert with_prefix != without
    start = first.token_to_id("<|im_start|>")
    assert first.encode("<|im_start|>user") == [start, *without]
    assert always.encode("<|im_start|>user") == [start, *with_prefix]
    assert never.encode("<|im_start|>user") == [start, *without]
    assert first.encode(" user") == with_prefix  # a leading space is the prefix; no second one is added


def test_sentencepiece_save_then_load_tokenizer_round_trips(sp_tok, tmp_path):
    sp_tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, SentencePieceTokenizer)
    assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id) == (
        sp_tok.vocab_size,
        sp_tok.bos_id,
        sp_tok.eos_id,
        sp_tok.pad_id,
    )
    assert again.chat_template == PLAIN_CHAT_TEMPLATE  # the fallback is written out, so exports render the same
    for text in SAMPLE_TEXTS:
        assert again.encode(text) == sp_tok.encode(text)


def test_sentencepiece_chatml_with_user_defined_eos(sp_model_proto, tmp_path):
    """eos declared as a user-defined piece becomes special (skipped by decode, a stop id), as in transformers."""
    tok = SentencePieceTokenizer(sp_model_proto, eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.eos_id == im_end and tok.stop_ids == (im_end, 2) and tok.is_special(im_end)  # </s> still stops
    tok.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    for messages in CONVERSATIONS:
        assert tok.encode_chat(messages) == ref.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )


def test_plain_chat_format_without_a_template(sp_tok):
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert sp_tok.chat_template is None
    assert (
        sp_tok.render_chat(messages, add_generation_prompt=False)
        == "<s>Be kind.\n\nUser: Hi\n\nAssistant: Hello</s>\n\n"
    )
    assert sp_tok.render_chat(messages[:2]).endswith("User: Hi\n\nAssistant:")
    ids = sp_tok.encode_chat(messages, add_generation_prompt=False)
    assert ids[0] == sp_tok.bos_id and sp_tok.eos_id in ids  # the assistant turn ends with a stop id
    with pytest.raises(ChatTemplateError, match="unknown chat role tool"):
        sp_tok.render_chat([{"role": "tool", "content": "x"}])


def test_non_llama_style_sentencepiece_warns_on_save(tmp_path, caplog):
    (tmp_path / "c.txt").write_text(_corpus(lines=300), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"),
        model_prefix=str(tmp_path / "u"),
        vocab_size=300,
        model_type="unigram",
        num_threads=1,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer((tmp_path / "u.model").read_bytes())
    with caplog.at_level("WARNING"):
        tok.save(tmp_path / "out")
    assert "may tokenize differently" in caplog.text


# ---------------------------------------------------------------------------------------------------
# tokenizer.json (byte-level BPE) and chat templates


def _train_byte_level_bpe(vocab_size: int = 500) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus().splitlines(), trainer=trainer)
    return backend


@pytest.fixture(scope="module")
def chatml_backend() -> tokenizers.Tokenizer:
    return _train_byte_level_bpe()


@pytest.fixture()
def chatml_tok(chatml_backend) -> HFTokenizer:
    return HFTokenizer(
        chatml_backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def test_hf_tokenizer_specials_and_stops(chatml_tok):
    assert chatml_tok.vocab_size == 500
    assert (chatml_tok.bos_id, chatml_tok.eos_id, chatml_tok.pad_id, chatml_tok.unk_id) == (1, 2, 2, 0)
    assert set(chatml_tok.stop_ids) == {2, 0}  # <|im_end|> and <|endoftext|>
    assert not chatml_tok.add_bos_token  # its tokenizer.json adds nothing in front of text


def test_hf_tokenizer_save_loads_in_transformers(chatml_tok, tmp_path):
    written = chatml_tok.save(tmp_path)
    assert sorted(Path(p).name for p in written) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 2048 and config["chat_template"] == CHATML_TEMPLATE
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS:
        ids = chatml_tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False) == ref.encode(text), text
        assert chatml_tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert chatml_tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert chatml_tok.render_chat(messages, gen) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
            assert chatml_tok.encode_chat(messages, gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, return_dict=False
            )
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer) and again.encode(TEST_STRING) == chatml_tok.encode(TEST_STRING)
    assert again.chat_template == CHATML_TEMPLATE and again.model_max_length == 2048


def test_config_special_tokens_become_special_as_in_transformers(tmp_path):
    """A tokenizer.json whose eos is plain vocabulary: the config's eos is matched whole and skipped by decode."""
    alphabet = "abcdefghijklmnopqrstuvwxyz<>|_ "
    vocab = {"<|end|>": 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    backend = tokenizers.Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    tok = load_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "say <|end|> then " + alphabet
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert 0 in tok.encode(text) and tok.stop_ids == (0,) and tok.is_special(0)
    assert (
        tok.decode(tok.encode(text))
        == ref.decode(tok.encode(text), skip_special_tokens=True)
        == "say  then " + alphabet
    )


LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system = 'Today is ' + strftime_now('%Y') %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_style_dir(tmp_path_factory) -> Path:
    """A tokenizer.json directory shaped like Llama 3's: BOS added by the post-processor, eos list in generation_config."""
    backend = _train_byte_level_bpe()
    backend.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    directory = tmp_path_factory.mktemp("llama3_style")
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": {
                    "__type": "AddedToken",
                    "content": "<|begin_of_text|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                },
                "eos_token": "<|eot_id|>",
                "chat_template": [
                    {"name": "default", "template": LLAMA3_STYLE_TEMPLATE},
                    {"name": "tool_use", "template": "x"},
                ],
                "model_max_length": 1000000000000000019884624838656,
            }
        )
    )
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [bos + 1, 2], "bos_token_id": bos}))
    return directory


def test_llama3_style_directory(llama3_style_dir, tmp_path):
    tok = load_tokenizer(llama3_style_dir)
    eot = tok.token_to_id("<|eot_id|>")
    assert tok.add_bos_token  # found in the post-processor: the config does not say
    assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") and tok.eos_id == eot
    assert tok.stop_ids[0] == eot and 2 in tok.stop_ids
    assert tok.model_max_length is None  # transformers' "unbounded" sentinel is not a real limit
    assert tok.chat_template == LLAMA3_STYLE_TEMPLATE  # the "default" of several named templates
    ref = transformers.AutoTokenizer.from_pretrained(llama3_style_dir)
    for messages in CONVERSATIONS:
        assert tok.render_chat(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert tok.encode_chat(messages) == ref.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )
    assert tok.encode("hi there", add_bos=True) == ref.encode("hi there")
    # And the same after our own export.
    tok.save(tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert exported.encode(TEST_STRING) == tok.encode(TEST_STRING, add_bos=True)
    assert exported.apply_chat_template(CONVERSATIONS[1], tokenize=False) == tok.render_chat(CONVERSATIONS[1], False)


def test_chat_template_errors_and_sandbox(llama3_style_dir):
    tok = load_tokenizer(llama3_style_dir)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        tok.render_chat([])
    with pytest.raises(ChatTemplateError, match="message 0"):
        tok.render_chat(["hello"])
    with pytest.raises(ChatTemplateError, match="does not compile.*line 2"):
        render_chat_template(
            "ok\n{% for %}", [{"role": "user", "content": "x"}], add_generation_prompt=True, special_tokens={}
        )
    # The sandbox keeps templates away from Python internals.
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template(
            "{{ messages.__class__.__mro__ }}",
            [{"role": "user", "content": "x"}],
            add_generation_prompt=True,
            special_tokens={},
        )
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template(
            "{% set ns = namespace() %}{% set ns._x = 1 %}",
            [{"role": "user", "content": "x"}],
            add_generation_prompt=True,
            special_tokens={},
        )


def test_chat_template_environment_matches_transformers(chatml_tok, tmp_path):
    """Whitespace control, loop controls, namespace, tojson, {% generation %}: rendered as transformers does."""
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {{ ns.n }}: {{ message | tojson }}\n"
        "    {% if message['role'] == 'assistant' %}{% generation %}[{{ message['content'] }}]{% endgeneration %}{% endif %}\n"
        "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{{ eos_token }}{% if add_generation_prompt %}<go>{% endif %}"
    )
    chatml_tok.chat_template = template
    chatml_tok.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        ours = chatml_tok.render_chat(messages)
        assert ours == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"content": "And the next one? 🙂"' in chatml_tok.render_chat(
        CONVERSATIONS[1]
    )  # no \u escapes, no HTML escapes


# ---------------------------------------------------------------------------------------------------
# GGUF metadata (files written here with the gguf package)


def _write_tokenizer_gguf(path: Path, fields: dict) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            writer.add_array(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_byte_level_bpe_matches_its_source(chatml_backend, tmp_path):
    vocab = chatml_backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(pair) for pair in json.loads(chatml_backend.to_str())["model"]["merges"]]
    types = [3 if t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") else 1 for t in tokens]
    path = _write_tokenizer_gguf(
        tmp_path / "bpe.gguf",
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": CHATML_TEMPLATE,
            "llama.context_length": 4096,
        },
    )
    tok = tokenizer_from_gguf(gguf.GGUFReader(str(path)))
    assert load_tokenizer(path).encode(TEST_STRING) == tok.encode(TEST_STRING)
    source = HFTokenizer(chatml_backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.model_max_length) == (500, 1, 2, 2, 4096)
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == source.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tok.encode_chat(CONVERSATIONS[1]) == source.encode(tok.render_chat(CONVERSATIONS[1]))


def test_gguf_sentencepiece_vocabulary_matches_sentencepiece(sp_model_proto, sp_tok, tmp_path):
    """A 'llama' (sentencepiece) GGUF vocabulary: merges rebuilt from scores segment like the original model."""
    proto = spm.SentencePieceProcessor(model_proto=sp_model_proto)
    n = proto.get_piece_size()
    types = []
    for i in range(n):
        types.append(2 if proto.is_unknown(i) else 3 if proto.is_control(i) else 6 if proto.is_byte(i) else 1)
    for t in ("<|im_start|>", "<|im_end|>"):
        types[proto.piece_to_id(t)] = 4
    path = _write_tokenizer_gguf(
        tmp_path / "spm.gguf",
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [proto.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(proto.get_score(i)) for i in range(n)],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
        },
    )
    tok = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok.add_bos_token  # llama.cpp's default for sentencepiece vocabularies
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        assert ids == sp_tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == sp_tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode("hi", add_bos=True) == ref.encode("hi")


def test_gguf_without_tokenizer_metadata(tmp_path):
    path = _write_tokenizer_gguf(tmp_path / "bare.gguf", {"general.name": "no tokenizer"})
    with pytest.raises(TokenizerError, match=r"bare\.gguf has no tokenizer\.ggml\.model"):
        load_tokenizer(path)
    with pytest.raises(TokenizerError, match="'bert'"):
        load_tokenizer(
            _write_tokenizer_gguf(
                tmp_path / "bert.gguf", {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
            )
        )


def test_truncated_gguf_names_the_file(chatml_backend, tmp_path):
    vocab = chatml_backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    path = _write_tokenizer_gguf(
        tmp_path / "cut.gguf",
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 2,
        },
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match=r"cut\.gguf.*truncated or corrupt"):
        load_tokenizer(path)


# ---------------------------------------------------------------------------------------------------
# bad input


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        TokenizerError, match=r"no tokenizer in .*expected tokenizer\.json or tokenizer\.model.*config\.json"
    ):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    assert issubclass(TokenizerError, UserError)


def test_corrupt_tokenizer_json_names_the_file(chatml_tok, tmp_path):
    chatml_tok.save(tmp_path)
    text = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError, match=r"cannot read the tokenizer file .*tokenizer\.json.*truncated or corrupt"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_model_names_the_file(sp_tok, tmp_path):
    sp_tok.save(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 definitely not a protobuf")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model is not a sentencepiece model"):
        load_tokenizer(tmp_path)


def test_corrupt_or_inconsistent_config_names_the_file(chatml_tok, tmp_path):
    chatml_tok.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text("{ not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tmp_path)
    config_path.write_text(json.dumps({**config, "eos_token": "<|no_such_token|>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|no_such_token\|>' is not in the tokenizer's vocabulary"):
        load_tokenizer(tmp_path)
    config_path.write_text(json.dumps({**config, "eos_token": None}))
    (tmp_path / "special_tokens_map.json").unlink()
    with pytest.raises(TokenizerError, match="names no eos_token"):
        load_tokenizer(tmp_path)
    # An eos id in generation_config.json is enough.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(tmp_path).eos_id == 2


def test_vocab_larger_than_embedding(chatml_tok):
    check_vocab_fits(chatml_tok, 500)
    check_vocab_fits(chatml_tok, 512)  # padded embeddings are fine
    with pytest.raises(VocabTooLargeError, match=r"500 tokens .* only 499 rows") as err:
        check_vocab_fits(chatml_tok, 499, source="ckpt/")
    assert "ckpt/" in str(err.value) and isinstance(err.value, UserError)


# ---------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smollm2_gguf(embedded_model_dir) -> Path:
    from models.fetch import embedded_gguf_path

    return embedded_gguf_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, tmp_path_factory):
    ours = load_tokenizer(smollm2_gguf)
    # The GGUF alone in a directory: beside it in the cache are tokenizer files we wrote, which transformers
    # would otherwise mix into its reference.
    alone = tmp_path_factory.mktemp("smollm2_gguf") / smollm2_gguf.name
    alone.symlink_to(smollm2_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(alone.parent, gguf_file=alone.name)
    assert ref.chat_template is not None
    return ours, ref


SMOLLM2_CHATS = [
    [{"role": "user", "content": "How do I bake a chocolate cake?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Bonjour ! Ça va ? 🙂"}],
    CONVERSATIONS[1],
    CONVERSATIONS[2],
    [{"role": "user", "content": "Explain:\n\tdef f(x):\n\t    return x**2  # 12345"}],
]


@pytest.mark.real_model
def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_pair):
    ours, ref = smollm2_pair
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (49152, 1, 2, 2)
    assert ours.stop_ids[0] == 2 and not ours.add_bos_token
    assert ours.special_tokens_map() == {
        k: v for k, v in ref.special_tokens_map.items() if k in ours.special_tokens_map()
    }
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    for messages in SMOLLM2_CHATS:
        for gen in (True, False):
            rendered = ours.render_chat(messages, add_generation_prompt=gen)
            assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode_chat(messages, gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, return_dict=False
            )
    # Without a system message the template inserts SmolLM's default one.
    assert "You are a helpful AI assistant named SmolLM" in ours.render_chat(SMOLLM2_CHATS[0])
    assert "SmolLM" not in ours.render_chat(SMOLLM2_CHATS[1])


@pytest.mark.real_model
def test_smollm2_tokenizer_export_loads_in_transformers(smollm2_pair, tmp_path):
    ours, _ = smollm2_pair
    ours.save(tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text)
        assert exported.encode(text, add_special_tokens=False) == ids == again.encode(text), text
        assert exported.encode(text) == ours.encode(text, add_bos=ours.add_bos_token), text
        assert exported.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    for messages in SMOLLM2_CHATS:
        for gen in (True, False):
            rendered = ours.render_chat(messages, gen)
            assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == rendered
            assert again.render_chat(messages, gen) == rendered
    assert again.stop_ids == ours.stop_ids and again.model_max_length == 8192


@pytest.mark.real_model
def test_smollm2_cached_directory_tokenizer_equals_gguf(smollm2_pair, embedded_model_dir):
    """The fetched cache directory (tokenizer written by our save, with config and generation_config beside it)."""
    ours, ref = smollm2_pair
    cached = load_tokenizer(embedded_model_dir)
    assert isinstance(cached, HFTokenizer)
    assert (cached.vocab_size, cached.bos_id, cached.eos_id, cached.pad_id, cached.stop_ids) == (
        ours.vocab_size,
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
        ours.stop_ids,
    )
    assert cached.encode(TEST_STRING) == ref.encode(TEST_STRING, add_special_tokens=False)
    assert cached.render_chat(SMOLLM2_CHATS[0]) == ref.apply_chat_template(
        SMOLLM2_CHATS[0], tokenize=False, add_generation_prompt=True
    )
