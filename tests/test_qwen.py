"""Qwen2/2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) through the family seam: random tiny
transformers checkpoints import with transformers' logits and greedy tokens, export back to a directory
transformers loads with no missing or unexpected weights, and shard over 8 devices unchanged."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from hf_helpers import randomize_, torch_logits, write_word_tokenizer
from models import hf_io
from models.export import export_params
from models.generation import Sampler
from models.sampling import SamplingParams
from models.sharding import MeshRules, ShardingRules, make_mesh
from models.sources import load, model_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128
TOKENS = np.array([[5, 17, 99, 3, 42, 64, 7, 120, 11, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6)


def _transformers_model(family: str, tie: bool, vocab: int = VOCAB):
    shapes = {**SHAPES, "vocab_size": vocab}
    if family == "qwen2":
        config, cls = transformers.Qwen2Config(**shapes, tie_word_embeddings=tie), transformers.Qwen2ForCausalLM
    else:  # Qwen3: head_dim 32 != hidden / heads, as in the released models
        config, cls = transformers.Qwen3Config(**shapes, head_dim=32, tie_word_embeddings=tie), transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    randomize_(model, seed=1)  # biases and q/k norm weights included: a dropped one would show
    if tie:  # randomize_ draws the (tied) embedding once; make sure the head really is that tensor
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.fixture(scope="module", params=[("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def checkpoint(request, tmp_path_factory):
    """(family, transformers reference model, its saved directory with a tokenizer)."""
    family, tie = request.param
    directory = tmp_path_factory.mktemp(f"{family}-{tie}")
    reference = _transformers_model(family, tie)
    reference.save_pretrained(directory, max_shard_size="40KB")  # sharded, with an index
    write_word_tokenizer(directory, VOCAB)
    return family, reference, directory


def test_import_matches_transformers_logits_and_greedy_tokens(checkpoint):
    family, reference, directory = checkpoint
    assert (directory / "model.safetensors.index.json").is_file()
    loaded = load(str(directory))
    assert loaded.config.family == family and loaded.config.qkv_bias == (family == "qwen2")
    assert loaded.config.qk_norm == (family == "qwen3")

    ours = np.asarray(loaded.model(jnp.asarray(TOKENS)))
    ref = torch_logits(reference, TOKENS)
    assert np.abs(ref).max() > 1.0  # the check below is not trivially satisfied
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    prompts = [[5, 17, 99, 3], [8, 9]]
    samples = Sampler(loaded.model, stop_ids=[], pad_id=0).generate(prompts, SamplingParams(max_new_tokens=8))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert samples.tokens[row].tolist() == expected, row


def test_export_loads_in_transformers_with_no_missing_or_unexpected_weights(checkpoint, tmp_path):
    family, reference, directory = checkpoint
    loaded = load(str(directory))
    out = export_params(tmp_path / "export", loaded.config, model_params(loaded.model), loaded.tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [type(reference).__name__]

    exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(exported) is type(reference)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    np.testing.assert_allclose(torch_logits(exported, TOKENS), torch_logits(reference, TOKENS), atol=1e-5, rtol=0)
    assert load(str(out)).config == loaded.config


def test_eight_device_mesh_equals_one_device(checkpoint, eight_devices):
    _, _, directory = checkpoint
    rules = ShardingRules.from_dict(yaml.safe_load((ROOT / "configs/sharding/default.yaml").read_text()))
    mesh_rules = MeshRules(make_mesh(data=1, fsdp=4, tensor=2, devices=eight_devices), rules)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 16)))
    forward = nnx.jit(lambda m, t: m(t))
    single = np.asarray(forward(load(str(directory)).model, tokens))
    sharded_model = load(str(directory), mesh_rules=mesh_rules).model
    specs = {p: v[...].sharding.spec for p, v in nnx.to_flat_state(nnx.state(sharded_model, nnx.Param))}
    extras = [p for p in specs if p[-1].endswith("_bias_NxH") or p[-1].endswith("_bias_KxH") or "q_norm" in p]
    assert extras  # the family's own parameters are there, laid out by the same rules
    # A sharded (re-ordered) fp32 reduction: agreement to about fp32's accuracy at the logits' scale.
    np.testing.assert_allclose(np.asarray(forward(sharded_model, tokens)), single, atol=1e-5 * np.abs(single).max(),
                               rtol=0)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(hf_io.HFModelError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen2ForCausalLM.*"
                                                 "Qwen3ForCausalLM"):
        hf_io.config_from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(hf_io.HFModelError, match="model_type qwen3_moe.*LlamaForCausalLM"):
        hf_io.config_from_hf({"model_type": "qwen3_moe"})
    with pytest.raises(hf_io.HFModelError, match="attention_bias=true"):
        hf_io.config_from_hf({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True, **SHAPES})


def test_qwen_sliding_window_caps_the_context_only_when_used():
    base = {"architectures": ["Qwen2ForCausalLM"], **SHAPES, "sliding_window": 64}
    assert hf_io.config_from_hf({**base, "use_sliding_window": False}).max_position_embeddings == 256
    assert hf_io.config_from_hf({**base, "use_sliding_window": True}).max_position_embeddings == 64


def _write_gguf(path: Path, family: str, reference) -> None:
    """`reference`'s weights as a float32 GGUF the way llama.cpp's converter writes qwen2/qwen3: tensor names
    from the gguf package's own name map, `<arch>.*` metadata, Q/K rows in HF order (NeoX RoPE)."""
    import gguf

    config = reference.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[family]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    for name, w in reference.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, w.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_gguf_import_matches_transformers(family, tmp_path):
    from models.gguf_io import read_gguf
    from models.sources import build_llama

    reference = _transformers_model(family, tie=False)
    _write_gguf(tmp_path / "m.gguf", family, reference)
    config, tensors, _ = read_gguf(tmp_path / "m.gguf")
    assert config.family == family and config.resolved_head_dim == (32 if family == "qwen3" else 16)
    model = build_llama(config, hf_io.params_from_hf(tensors, config, "m.gguf"))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), torch_logits(reference, TOKENS), atol=1e-4, rtol=0)


# ChatML as the Qwen instruct models use it (written here, not copied): a default system turn when the
# conversation has none, <|im_start|>role ... <|im_end|> turns, and no BOS token at all.
QWEN_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_qwen_style_tokenizer(directory: Path) -> None:
    """A byte-level BPE like Qwen's (trained here on a few lines) with Qwen's special tokens and no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["system user assistant", "You are a helpful assistant.", "hi there"] * 4, trainer)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": QWEN_STYLE_TEMPLATE, "model_max_length": 256}))


def test_tokenizer_and_chat_template_as_qwen_ships_them_survive_import_and_export(tmp_path):
    reference = _transformers_model("qwen2", tie=True, vocab=320)  # 256 bytes + merges + specials fit
    reference.save_pretrained(tmp_path / "m")
    _write_qwen_style_tokenizer(tmp_path / "m")
    loaded = load(str(tmp_path / "m"))
    tok = loaded.tokenizer
    assert tok.bos_id is None and tok.id_to_token(tok.eos_id) == "<|im_end|>"
    messages = [{"role": "user", "content": "hi there"}]
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path / "m").apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert tok.render_chat(messages) == expected and expected.startswith("<|im_start|>system\n")

    out = export_params(tmp_path / "export", loaded.config, model_params(loaded.model), tok)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported.bos_token is None and exported.eos_token == "<|im_end|>" and exported.pad_token == "<|endoftext|>"
    ids = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == tok.encode_chat(messages)


def test_a_local_name_is_a_model_directory_in_the_cache(tmp_path, monkeypatch):
    from models.sources import ModelSourceError, resolve

    monkeypatch.setenv("CAIRL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="unknown model name 'qwen3-tiny'.*cache/models/qwen3-tiny"):
        resolve("qwen3-tiny")
    directory = tmp_path / "cache" / "models" / "qwen3-tiny"
    _transformers_model("qwen3", tie=True).save_pretrained(directory)
    write_word_tokenizer(directory, VOCAB)
    assert resolve("qwen3-tiny") == ("hf", directory)
    assert load("qwen3-tiny").config.family == "qwen3"
    with pytest.raises(ModelSourceError, match="known models: .*qwen3-tiny"):
        resolve("qwen3-other")


# The constructs Qwen3's shipped template relies on (written here, not copied): a namespace updated inside
# a loop, a reversed slice of the messages, string methods splitting off a <think> block, `is defined`
# tests on an optional variable (enable_thinking) and tojson for tools.
QWEN3_STYLE_TEMPLATE = """{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages[::-1] -%}
  {%- if m.role == 'user' and not m.content.startswith('<tool_response>') and ns.last_query == -1 -%}
    {%- set ns.last_query = messages|length - 1 - loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}<|im_start|>system
{{ tools | map('tojson') | join('\\n') }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
  {%- set content = m.content -%}
  {%- if m.role == 'assistant' and '</think>' in content -%}
    {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}
    {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- if loop.index0 > ns.last_query -%}{%- set content = '<think>\\n' + reasoning + '\\n</think>\\n\\n' + content -%}{%- endif -%}
  {%- endif -%}
<|im_start|>{{ m.role }}
{{ content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif -%}{%- endif -%}"""


def test_a_qwen3_style_template_renders_as_transformers_renders_it(tmp_path):
    reference = _transformers_model("qwen3", tie=True, vocab=320)
    reference.save_pretrained(tmp_path / "m")
    _write_qwen_style_tokenizer(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3_STYLE_TEMPLATE}))
    ours = load(str(tmp_path / "m")).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nthere"},
                {"role": "user", "content": "you are helpful"}]
    for history in (messages, messages[:2]):
        for generation in (True, False):
            expected = theirs.apply_chat_template(history, add_generation_prompt=generation, tokenize=False)
            assert ours.render_chat(history, add_generation_prompt=generation) == expected
    # Reasoning is kept only after the last user turn: the namespace really was updated inside the loop.
    assert "<think>\nhmm" not in ours.render_chat(messages) and "<think>\nhmm" in ours.render_chat(messages[:2], False)
