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


def _transformers_model(family: str, tie: bool):
    if family == "qwen2":
        config, cls = transformers.Qwen2Config(**SHAPES, tie_word_embeddings=tie), transformers.Qwen2ForCausalLM
    else:  # Qwen3: head_dim 32 != hidden / heads, as in the released models
        config, cls = transformers.Qwen3Config(**SHAPES, head_dim=32, tie_word_embeddings=tie), transformers.Qwen3ForCausalLM
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
