"""Loading onto an 8-fake-device mesh (fsdp=4 x tensor=2): same logits as one device, weights sharded as the rules say."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_helpers import write_word_tokenizer
from models.config import PRESETS
from models.export import export_params
from models.llama import logical_axes_tree
from models.sharding import MeshRules, ShardingRules, make_mesh
from models.sources import build_llama, load, model_params
from models.tokenizer import load_tokenizer
from test_model import random_params

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mesh_rules(eight_devices):
    rules = ShardingRules.from_dict(yaml.safe_load((ROOT / "configs/sharding/default.yaml").read_text()))
    return MeshRules(make_mesh(data=1, fsdp=4, tensor=2, devices=eight_devices), rules)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    config = PRESETS["tiny"].replace(tie_embeddings=False)
    write_word_tokenizer(root / "tok", config.vocab_size)
    return export_params(root / "model", config, random_params(config, seed=3, gain=0.5), load_tokenizer(root / "tok"))


def test_sharded_load_gives_single_device_logits(tiny_dir, mesh_rules):
    single = load(str(tiny_dir))
    sharded = load(str(tiny_dir), mesh_rules=mesh_rules)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)))  # batch divisible by data*fsdp
    expected = np.asarray(nnx.jit(lambda m, t: m(t))(single.model, tokens))
    got = np.asarray(nnx.jit(lambda m, t: m(t))(sharded.model, tokens))
    # Logits of order 1: the 1e-5 bound is then about fp32's accuracy for a sharded (re-ordered) reduction.
    assert 1.0 < np.abs(expected).max() < 10.0
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_params_carry_the_rules_shardings(tiny_dir, mesh_rules):
    model = load(str(tiny_dir), mesh_rules=mesh_rules).model
    axes = dict(nnx.to_flat_state(logical_axes_tree(model)))
    spec_of = {path: v[...].sharding.spec for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, logical in axes.items():
        assert spec_of[path] == mesh_rules.rules.spec(logical), path
    # Golden specs from configs/sharding/default.yaml (embed->fsdp; vocab, heads, kv_heads, mlp->tensor).
    assert spec_of[("embed_VxD",)] == P("tensor", "fsdp")
    assert spec_of[("lm_head_DxV",)] == P("fsdp", "tensor")
    assert spec_of[("blocks", 0, "attn", "q_DxNxH")] == P("fsdp", "tensor", None)
    assert spec_of[("blocks", 1, "mlp", "down_FxD")] == P("tensor", "fsdp")
    embed = model.embed_VxD[...]
    assert {s.data.shape for s in embed.addressable_shards} == {(128, 16)}  # 256/2 x 64/4 per device


def test_sharded_params_round_trip_to_host(mesh_rules):
    config = PRESETS["tiny"]
    params = random_params(config, seed=4)
    model = build_llama(config, params, mesh_rules)
    back = model_params(model)
    for path, w in params.items():
        assert np.array_equal(back[path], w), path
    assert all(len(v[...].sharding.device_set) == 8 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert jax.device_count() == 8


def test_scalar_model_backbone_from_a_checkpoint(tiny_dir, mesh_rules):
    """Value / reward models: checkpoint params under ("backbone",), the head supplied by the caller."""
    from models.llama import ScalarModel
    from models.sources import build_module, load_checkpoint

    ckpt = load_checkpoint(str(tiny_dir))
    head_D = np.random.default_rng(0).standard_normal(ckpt.config.hidden_size).astype(np.float32)
    params = {("backbone", *path): w for path, w in ckpt.params.items()}
    params[("head_D",)], params[("head_bias",)] = head_D, np.float32(0.5)
    value_model = build_module(lambda: ScalarModel(ckpt.config, nnx.Rngs(0), mesh_rules), params, mesh_rules)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8)))
    values = np.asarray(nnx.jit(lambda m, t: m(t))(value_model, tokens))
    hidden, _ = build_llama(ckpt.config, ckpt.params).hidden(tokens)
    np.testing.assert_allclose(values, np.asarray(hidden) @ head_D + 0.5, atol=1e-5, rtol=0)
    assert value_model.backbone.embed_VxD[...].sharding.spec == P("tensor", "fsdp")
