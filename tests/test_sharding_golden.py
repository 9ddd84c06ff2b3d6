"""Golden PartitionSpec of every parameter (policy and value/reward models) on a reference mesh.

A change to the rules table or the model's logical axes shows up here as a diff. To accept an
intended change: CAIRL_UPDATE_GOLDEN=1 pytest tests/test_sharding_golden.py
"""

import json
import os
from pathlib import Path

import pytest
from flax import nnx

from models.config import preset
from models.llama import Llama, ScalarModel
from models.sharding import param_shardings
from trainer.mesh import MeshConfig, build_mesh_rules

GOLDEN = Path(__file__).parent / "golden" / "partition_specs_tiny_data2_fsdp2_tensor2.json"


def _specs(mesh_rules) -> dict:
    out = {}
    for name, cls in (("policy", Llama), ("value", ScalarModel)):
        abstract = nnx.eval_shape(lambda cls=cls: cls(preset("tiny"), nnx.Rngs(0), mesh_rules))
        flat = nnx.to_flat_state(param_shardings(abstract, mesh_rules))
        out[name] = {"/".join(map(str, path)): str(sharding.spec) for path, sharding in flat}
    return out


def test_partition_specs_match_golden(eight_devices):
    specs = _specs(build_mesh_rules(MeshConfig(data=2, fsdp=2, tensor=2)))
    if os.environ.get("CAIRL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden file rewritten")
    golden = json.loads(GOLDEN.read_text())
    assert specs == golden
    # The golden file itself is meaningful: big matrices are split on both fsdp and tensor.
    assert golden["policy"]["blocks/0/mlp/gate_DxF"] == "P('fsdp', 'tensor')"
    assert golden["policy"]["embed_VxD"] == "P('tensor', 'fsdp')"
