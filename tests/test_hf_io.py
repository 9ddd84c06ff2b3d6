"""HF checkpoints in and out: random transformers models import with transformers' logits; exports load back."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from hf_helpers import randomize_, torch_logits, write_word_tokenizer
from models import hf_io, safetensors_io
from models.config import PRESETS
from models.export import export_params
from models.llama import Llama
from models.sources import build_llama, load, load_checkpoint, model_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[5, 17, 99, 3, 42, 64, 7, 120, 11, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def _import_weights_only(directory):
    config, _ = hf_io.read_config(directory)
    params = hf_io.params_from_hf(hf_io.read_weights(directory), config, str(directory))
    return config, build_llama(config, params)


def _save_random(model_cls, config, directory, **save_kwargs):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize_(model)
    model.save_pretrained(directory, **save_kwargs)
    return model


def test_llama3_rope_gqa_untied_multishard_checkpoint_matches_transformers(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    reference = _save_random(transformers.LlamaForCausalLM, config, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2

    ours_config, model = _import_weights_only(tmp_path)
    assert ours_config.rope_scaling is not None and ours_config.rope_scaling.factor == 8.0
    assert not ours_config.tie_embeddings and ours_config.num_kv_heads == 2
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    ref = torch_logits(reference, TOKENS)
    assert np.abs(ref).max() > 1.0  # the check below is not trivially satisfied
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_mistral_checkpoint_matches_transformers(tmp_path):
    config = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=None,
    )
    reference = _save_random(transformers.MistralForCausalLM, config, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours_config, model = _import_weights_only(tmp_path)
    assert ours_config.resolved_head_dim == 32  # head_dim != hidden / heads
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), torch_logits(reference, TOKENS), atol=1e-4, rtol=0)


def _tiny_model(seed=0, tie=True):
    config = PRESETS["tiny"].replace(tie_embeddings=tie, vocab_size=128)
    model = Llama(config, nnx.Rngs(seed))
    # Random norm scales too, so a swapped or dropped norm weight would show.
    for block in model.blocks:
        block.attn_norm.scale[...] = 1 + 0.1 * jnp.arange(config.hidden_size) / config.hidden_size
    return config, model


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_and_reimports_bitwise(tmp_path, tie):
    config, model = _tiny_model(tie=tie)
    write_word_tokenizer(tmp_path / "tok", 128)
    from models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "tok")
    params = model_params(model)
    out = export_params(tmp_path / "export", config, params, tokenizer, max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file()  # small shards: several files

    reference, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(torch_logits(reference.float(), TOKENS), ours, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("w5 w17 w99 </s>", add_special_tokens=False) == tokenizer.encode("w5 w17 w99 </s>")

    again = load(str(out))
    assert again.config == config.replace(head_dim=config.resolved_head_dim)
    reimported = model_params(again.model)
    assert reimported.keys() == params.keys()
    for path, w in params.items():
        assert reimported[path].dtype == w.dtype and np.array_equal(reimported[path], w), path
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(tokenizer.stop_ids) and generation["pad_token_id"] == tokenizer.pad_id


def test_bfloat16_export_within_bfloat16_tolerance(tmp_path):
    config, model = _tiny_model()
    write_word_tokenizer(tmp_path / "tok", 128)
    from models.tokenizer import load_tokenizer

    out = export_params(tmp_path / "bf16", config, model_params(model), load_tokenizer(tmp_path / "tok"), dtype="bfloat16")
    header = safetensors_io.read_header(out / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    # bf16 keeps 8 mantissa bits: weights move by <= 2^-9 relative, logits by about that times their scale.
    np.testing.assert_allclose(torch_logits(reference, TOKENS), ours, atol=0.02 * np.abs(ours).max(), rtol=0)


def test_safetensors_roundtrip_bfloat16_and_truncation(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), ml_dtypes.bfloat16)}
    safetensors_io.save(tmp_path / "x.safetensors", tensors)
    back = safetensors_io.load(tmp_path / "x.safetensors")
    assert back["b"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["a"], tensors["a"])
    from safetensors.numpy import load_file  # the reference reader agrees on the fp32 tensor

    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(safetensors_io.SafetensorsError, match="truncated"):
        safetensors_io.load(tmp_path / "cut.safetensors")
    safetensors_io.save(tmp_path / "f32.safetensors", {"a": tensors["a"]})
    assert np.array_equal(load_file(str(tmp_path / "f32.safetensors"))["a"], tensors["a"])


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(hf_io.HFModelError, match="unsupported architecture 'GPT2LMHeadModel'"):
        hf_io.config_from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(hf_io.HFModelError, match="no config.json"):
        hf_io.read_config(tmp_path)
    with pytest.raises(hf_io.HFModelError, match="rope scaling type 'yarn'"):
        hf_io.config_from_hf({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}})
    assert hf_io.parse_size("2GB") == 2 * 10**9 and hf_io.parse_size("1GiB") == 2**30 and hf_io.parse_size("10") == 10


def test_tokenizer_larger_than_embedding_is_rejected(tmp_path):
    config, model = _tiny_model()
    write_word_tokenizer(tmp_path / "tok", 128)
    from models.tokenizer import VocabTooLargeError, load_tokenizer

    out = export_params(tmp_path / "m", config, model_params(model), load_tokenizer(tmp_path / "tok"))
    write_word_tokenizer(out, 200)  # replace the tokenizer with a bigger one
    with pytest.raises(VocabTooLargeError, match="200 tokens"):
        load_checkpoint(str(out))


# -- the real embedded model through `cairl export` ----------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one?"},
]
TRICKY_TEXT = "Héllo wörld — 你好，世界! Ünïcödé 🤖🎉👩‍👩‍👧  two  spaces\ttab\n\nnewlines   end "


@pytest.fixture(scope="module")
def smollm2_export(smollm2, tmp_path_factory):
    from trainer.cli import main

    out = tmp_path_factory.mktemp("export") / "smollm2"
    assert main(["export", "--model", "smollm2-135m-instruct", "--out", str(out)]) == 0
    return out


@pytest.mark.real_model
def test_smollm2_export_loads_in_transformers_with_our_logits_template_and_tokens(smollm2, smollm2_export):
    tok = smollm2.tokenizer
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(smollm2_export, dtype=torch.float32,
                                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = np.array([tok.encode_chat(MESSAGES)])
    ours = np.asarray(smollm2.model(jnp.asarray(ids)))
    # Logits reach ~40 here, so two fp32 implementations each ~1e-4 from the exact value (measured: ours
    # 8.8e-5, transformers' 6.8e-5) can be 1.2e-4 apart. The 1e-4 bound is checked against transformers in
    # float64, which isolates our own error; fp32 vs fp32 gets the sum of both errors.
    np.testing.assert_allclose(torch_logits(reference, ids), ours, atol=2e-4, rtol=0)
    exact = transformers.AutoModelForCausalLM.from_pretrained(smollm2_export, dtype=torch.float64)
    with torch.no_grad():
        exact_logits = exact(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, exact_logits, atol=1e-4, rtol=0)
    del exact

    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_export)
    for messages in (MESSAGES, MESSAGES[1:2]):
        assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.render_chat(messages)
    assert hf_tok.encode(TRICKY_TEXT, add_special_tokens=False) == tok.encode(TRICKY_TEXT)
    assert hf_tok.decode(tok.encode(TRICKY_TEXT)) == TRICKY_TEXT

    again = model_params(load(str(smollm2_export)).model)  # re-import: bitwise identical in fp32
    original = model_params(smollm2.model)
    assert again.keys() == original.keys()
    assert all(again[p].dtype == np.float32 and np.array_equal(again[p], w) for p, w in original.items())


@pytest.mark.real_model
def test_smollm2_bfloat16_export(smollm2, tmp_path):
    from trainer.cli import main

    out = tmp_path / "bf16"
    assert main(["export", "--model", "smollm2-135m-instruct", "--out", str(out), "--dtype", "bfloat16",
                 "--max-shard-size", "100MB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 3  # 270 MB of bf16 weights
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = np.array([smollm2.tokenizer.encode_chat(MESSAGES)])
    theirs = torch_logits(reference, ids)
    # Our model on the same (bf16-rounded) weights, both computing in fp32: the sum of two fp32
    # implementations' errors, as in test_smollm2_export_loads_in_transformers_... (2e-4 at logits ~20).
    rounded = load(str(out))
    np.testing.assert_allclose(theirs, np.asarray(rounded.model(jnp.asarray(ids))), atol=2e-4, rtol=0)
    # ...and close to the fp32 original: bf16 rounding (2^-9 relative per weight) moves logits by a few tenths.
    original = np.asarray(smollm2.model(jnp.asarray(ids)))
    assert np.abs(theirs - original).max() < 0.05 * np.abs(original).max()
    assert np.mean(theirs.argmax(-1) == original.argmax(-1)) > 0.9


def test_sentencepiece_model_round_trips_through_export(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from models.tokenizer import SentencePieceTokenizer

    words = ["cake", "flour", "sugar", "oven", "bake", "mix", "egg", "the", "a", "and", "with", "42", "Grüße", "🍰"]
    rng = np.random.default_rng(0)
    corpus = "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(400))
    (tmp_path / "corpus.txt").write_text(corpus, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    tokenizer = SentencePieceTokenizer((tmp_path / "sp.model").read_bytes())
    config = PRESETS["tiny"].replace(vocab_size=tokenizer.vocab_size)
    model = Llama(config, nnx.Rngs(5))
    out = export_params(tmp_path / "export", config, model_params(model), tokenizer)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "bake the cake with flour and 42 eggs 🍰 Grüße, unseen wörds!"
    ids = tokenizer.encode(text, add_bos=True)
    assert hf_tok.encode(text) == ids and len(ids) > 10
    reference = transformers.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(torch_logits(reference, np.array([ids])), np.asarray(model(jnp.asarray([ids]))),
                               atol=1e-4, rtol=0)


def test_every_family_maps_every_parameter_once():
    """Each family's checkpoint names (models/families/) cover the model's parameters exactly, in HF's
    order (embedding, layers, the rest), and its GGUF names lead to those HF names."""
    from flax import nnx

    from models import families
    from models.config import preset
    from models.llama import Llama

    for tied in (True, False):
        for family in families.FAMILIES:
            config = preset("tiny").replace(tie_embeddings=tied, family=family.name)
            model = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
            flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
            ours = {tuple(p) for p, _ in flat}
            assert sum(int(np.prod(v.shape)) for _, v in flat) == config.num_params(), family.name
            names = family.hf_names(config.num_layers, config.tie_embeddings)
            assert sorted(names.values(), key=str) == sorted(ours, key=str), family.name
            assert list(names)[0] == "model.embed_tokens.weight" and list(names)[1].startswith("model.layers.0.")
            gguf = [family.hf_name_of_gguf(n) for n in family.gguf_global_names] + [
                family.hf_name_of_gguf(f"blk.0.{n}") for n in family.gguf_layer_names]
            assert set(gguf) <= set(family.hf_names(config.num_layers, False)), family.name
    assert families.by_hf_architecture("MistralForCausalLM").sliding_window_caps_context
    assert families.by_gguf_architecture("llama") is families.LLAMA
    assert families.by_gguf_architecture("qwen3") is families.QWEN3 and not families.QWEN3.gguf_qk_permuted
