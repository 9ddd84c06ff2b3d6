"""Mesh construction and the checks that reject meshes the model or batch cannot use."""

import pytest

from models.config import preset
from models.sharding import ShardingRulesError
from trainer.mesh import MeshConfig, MeshError, batch_shards, build_mesh_rules, check_batch, check_model, load_rules


def test_minus_one_takes_the_remaining_devices(eight_devices):
    mesh_rules = build_mesh_rules(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh_rules.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert batch_shards(mesh_rules) == 4  # default rules split the batch over data × fsdp


def test_axis_product_must_match_device_count(eight_devices):
    with pytest.raises(ShardingRulesError, match="3×1×1 ≠ 8"):
        build_mesh_rules(MeshConfig(data=3))
    with pytest.raises(ShardingRulesError, match="not divisible"):
        build_mesh_rules(MeshConfig(data=-1, fsdp=3))


def test_mesh_config_rejects_bad_sizes():
    with pytest.raises(MeshError, match="mesh.fsdp"):
        MeshConfig(fsdp=0)
    with pytest.raises(MeshError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)


def test_heads_must_divide_over_tensor(eight_devices):
    tiny = preset("tiny")  # 4 heads, 2 kv heads
    check_model(build_mesh_rules(MeshConfig(data=-1, tensor=2)), tiny)
    with pytest.raises(MeshError, match="num_kv_heads = 2 is not divisible by mesh.tensor = 4"):
        check_model(build_mesh_rules(MeshConfig(data=-1, tensor=4)), tiny)
    with pytest.raises(MeshError, match="num_heads = 4 is not divisible by mesh.tensor = 8"):
        check_model(build_mesh_rules(MeshConfig(data=1, tensor=8)), tiny)


def test_every_sharded_parameter_dimension_must_divide(eight_devices):
    odd_embed = preset("tiny").replace(hidden_size=60, head_dim=16)  # embed 60 over fsdp = 8
    with pytest.raises(MeshError, match="embed = 60"):
        check_model(build_mesh_rules(MeshConfig(data=1, fsdp=8)), odd_embed)


def test_batch_must_divide_over_batch_shards(eight_devices):
    mesh_rules = build_mesh_rules(MeshConfig(data=2, fsdp=2, tensor=2))
    check_batch(mesh_rules, 8)
    with pytest.raises(MeshError, match=r"batch size 6 is not divisible by the 4 batch shards of the mesh \(data=2×fsdp=2\)"):
        check_batch(mesh_rules, 6)


def test_rules_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("params:\n  embed: fsdp\n  colour: data\nactivations: {}\n")
    with pytest.raises(ShardingRulesError, match=rf"{bad}.*unknown logical axes \['colour'\]"):
        load_rules(bad)
    bad.write_text("params:\n  embed: pipeline\nactivations: {}\n")
    with pytest.raises(ShardingRulesError, match="unknown mesh axis 'pipeline'"):
        load_rules(bad)


def test_unmatched_and_colliding_axes_raise():
    rules = load_rules()
    with pytest.raises(ShardingRulesError, match="no params rule for logical axis 'length'"):
        rules.spec(("length", "embed"))
    with pytest.raises(ShardingRulesError, match="both map to mesh axis 'tensor'"):
        rules.spec(("heads", "mlp"))


def test_every_shipped_rules_table_parses_and_covers_the_model(eight_devices):
    from pathlib import Path

    tables = sorted((Path(__file__).resolve().parent.parent / "configs" / "sharding").glob("*.yaml"))
    assert len(tables) >= 2
    for table in tables:
        mesh_rules = build_mesh_rules(MeshConfig(data=-1, fsdp=2, tensor=2, rules=str(table)))
        check_model(mesh_rules, preset("tiny"))
