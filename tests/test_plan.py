"""`cairl plan`: targets, abstract states and compiled per-device figures, by hand where they can be.

Tests marked `plan` compile (seconds to a minute each on 2 cores; `make test-plan`): on the 8 fake
CPU devices, or for TPU / GPU devices that are not here (libtpu from `pip install -e '.[plan]'`, the
CUDA plugin from `make plan-deps`), skipped with the reason when those are not installed.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import load_run_config
from trainer.mesh import MeshConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[plan]')")
needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                       reason="CUDA plugin not installed (make plan-deps)")


def tiny_config(*overrides):
    return load_run_config(TINY, ["model.source=tiny", "run.stages=[sl]", *overrides])


# ------------------------------------------------------------------------------------- targets


def test_targets_parse_and_name_what_is_known():
    from trainer.plan.targets import TargetError, parse_target

    v5e = parse_target("tpu:v5e:4x4")
    assert (v5e.kind, v5e.chip, v5e.topology, v5e.slices, v5e.count) == ("tpu", "v5e", "4x4", 1, 16)
    two = parse_target("tpu:v5p:4x4x4x2slices")
    assert (two.topology, two.slices, two.count) == ("4x4x4", 2, 128)
    gpus = parse_target("gpu:h200x16")
    assert (gpus.chip, gpus.topology, gpus.count) == ("h200", "1x2x8", 16)
    assert parse_target("local").kind == "local"
    with pytest.raises(TargetError, match="known TPU chips: v5e, v5p, v6e"):
        parse_target("tpu:v9z:4x4")
    with pytest.raises(TargetError, match="known GPUs: h100, h200"):
        parse_target("gpu:a999x8")
    with pytest.raises(TargetError, match="multiple of 8"):
        parse_target("gpu:h100x12")
    with pytest.raises(TargetError, match="expected local, tpu:"):
        parse_target("tpu-v5e-16")


def test_a_mesh_that_does_not_match_the_target_is_explained():
    from trainer.plan.abstract import PlanInputError, resolve_mesh_config

    with pytest.raises(PlanInputError, match=r"2×2×1 = 4 devices, but tpu:v5e:4x4 has 16; set one axis to -1"):
        resolve_mesh_config(MeshConfig(data=2, fsdp=2, tensor=1), 16, "tpu:v5e:4x4")
    with pytest.raises(PlanInputError, match="multiply to 3, which does not divide the 16 devices"):
        resolve_mesh_config(MeshConfig(data=-1, fsdp=3), 16, "tpu:v5e:4x4")
    assert resolve_mesh_config(MeshConfig(data=-1, fsdp=4), 16, "x").data == 4


def test_model_shape_comes_from_a_preset_without_weights():
    from trainer.plan.abstract import PlanInputError, plan_model_config

    config = load_run_config(None, ["model.source=llama-3-8b", "model.dtype=bfloat16", "model.remat=true"])
    model = plan_model_config(config)
    assert (model.num_layers, model.hidden_size, model.dtype, model.remat) == (32, 4096, "bfloat16", True)
    with pytest.raises(PlanInputError, match="preset"):
        plan_model_config(load_run_config(None, ["model.source=/nonexistent/model"]))


# ---------------------------------------------------------------------------- local CPU devices


def _hand_param_bytes(model, shards: int) -> int:
    """Every tiny Llama parameter has an `embed` dimension, split over fsdp (64 / 8 rows each)."""
    return model.num_params() * 4 // shards


@pytest.mark.plan
def test_tiny_plan_on_local_devices_matches_shard_sizes_and_a_real_step(eight_devices):
    from trainer.plan.planner import make_plan
    from trainer.plan.targets import parse_target
    from trainer.plan.abstract import plan_model_config
    from trainer.mesh import build_mesh_rules
    from trainer.state import create_train_state
    from trainer.steps import make_sft_step
    from models.llama import Llama

    config = tiny_config("model.mesh.data=1", "model.mesh.fsdp=8", "sl.batch_size=8")
    plan = make_plan(config, parse_target("local"))
    (sft,) = plan.programs
    model = plan_model_config(config)
    params = _hand_param_bytes(model, 8)
    assert sft.name == "sft_update" and plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sft.param_bytes == params
    # AdamW moments mirror the parameters; the optimizer's counters are int32 scalars.
    assert params * 2 <= sft.opt_state_bytes <= params * 2 + 64
    batch = 3 * (8 // 8) * 96 * 4  # tokens, attention mask, loss mask: one row of 96 int32 per device
    scalars = 4 + 8 + 4  # step, rng key, non-finite streak
    assert sft.argument_bytes == sft.param_bytes + sft.opt_state_bytes + scalars + batch
    assert sft.fits and plan.fits

    # The same step built from real arrays, as the learner builds it: the plan's peak within 10 %.
    rules = build_mesh_rules(MeshConfig(data=1, fsdp=8), eight_devices)
    state = create_train_state(lambda rngs: Llama(model, rngs, rules), config.sl.optimizer, rules)
    batch_arrays = {k: np.zeros((8, 96), np.int32) for k in ("tokens_BxT", "attention_mask_BxT", "loss_mask_BxT")}
    real = make_sft_step(state, rules).lower(state, batch_arrays).compile().memory_analysis()
    real_peak = max(real.peak_memory_in_bytes,
                    real.argument_size_in_bytes + real.output_size_in_bytes - real.alias_size_in_bytes
                    + real.temp_size_in_bytes)
    assert abs(sft.peak_bytes - real_peak) <= 0.1 * real_peak


@pytest.mark.plan
def test_plan_command_writes_plan_json_with_stable_keys(tmp_path, eight_devices):
    from trainer.cli import main

    code = main(["plan", "--config", TINY, "model.source=tiny", "run.stages=[sl]", "model.mesh.data=-1",
                 "sl.batch_size=8", "--out", str(tmp_path)])
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan) == {"target", "device", "devices", "mesh", "model", "capacity_bytes", "margin", "budget_bytes",
                         "fits", "programs"}
    assert set(plan["programs"][0]) >= {"name", "stage", "param_bytes", "opt_state_bytes", "temp_bytes",
                                        "peak_bytes", "resident_bytes", "total_bytes", "flops", "est_seconds", "fits"}
    assert plan["devices"] == 8 and plan["fits"] is True


def test_plan_refuses_a_bad_target_with_exit_2(tmp_path, capsys):
    from trainer.cli import main

    assert main(["plan", "--config", TINY, "model.source=tiny", "--target", "tpu:v7x:2x2"]) == 2
    assert "known TPU chips" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


# ------------------------------------------------------------------- compile-only TPU and GPU


def _plan_cli(tmp_path, target, *overrides):
    """`cairl plan` in a child process: compile-only devices need their own JAX backend set-up."""
    env_cmd = [sys.executable, "-m", "trainer.cli", "plan", "--config", TINY, "model.source=tiny", *overrides,
               "--target", target, "--out", str(tmp_path)]
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(env_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.plan
@pytest.mark.parametrize("target, devices, device, capacity_gib", [
    pytest.param("tpu:v5e:2x2", 4, "TPU v5e", 16, marks=needs_libtpu),
    pytest.param("gpu:h100x8", 8, "NVIDIA H100 SXM", 80, marks=needs_cuda_plugin),
])
def test_tiny_plan_for_a_target_that_is_not_here(tmp_path, target, devices, device, capacity_gib):
    from models.config import PRESETS

    proc = _plan_cli(tmp_path, target, "run.stages=[sl]", "model.mesh.data=1", "model.mesh.fsdp=-1",
                     f"sl.batch_size={devices}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    (sft,) = plan["programs"]
    assert plan["devices"] == devices and plan["device"] == device
    assert sft["param_bytes"] == _hand_param_bytes(PRESETS["tiny"], devices)
    assert sft["est_seconds"] > 0 and sft["fits"]
    if target.startswith("tpu"):
        assert plan["capacity_bytes"] == capacity_gib << 30


@pytest.mark.plan
@needs_libtpu
def test_an_oversized_run_is_refused_with_numbers_and_advice(tmp_path):
    # Tiny weights, but 16384 rows of 512 tokens: batch 1024 measured 4.9 GB per device, this is ~16× that.
    proc = _plan_cli(tmp_path, "tpu:v5e:2x2", "run.stages=[sl]", "model.mesh.data=1", "model.mesh.fsdp=-1",
                     "sl.batch_size=16384", "sl.max_seq_len=512")
    assert proc.returncode == 2, proc.stderr[-3000:]
    paragraph = proc.stdout.strip().splitlines()[-1]
    assert paragraph.startswith("This run does not fit tpu:v5e:2x2 (4 × TPU v5e, 16.00 GiB each")
    assert "sft_update" in paragraph and "GiB per device" in paragraph
    assert "model.remat=true" in paragraph and "sl.optimizer.grad_accum_steps=" in paragraph
    assert "a bigger slice" in paragraph and "model.lora.rank=8 (LoRA adapters on q/k/v/o" in paragraph
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is False


@needs_libtpu
def test_a_topology_libtpu_does_not_make_names_those_that_work():
    from trainer.plan.targets import TargetError, parse_target

    with pytest.raises(TargetError, match=r"no v5e topology '3x5'.*topologies that work: v5e:2x2, v5e:4x4"):
        parse_target("tpu:v5e:3x5").devices()


@pytest.mark.plan
@needs_libtpu
def test_llama3_8b_parameters_per_device_on_v5p_by_hand():
    """No compile: the abstract states alone, on the 64 compile-only devices of a v5p 4x4x4 slice."""
    from trainer.plan.abstract import abstract_states, per_device_bytes, plan_mesh_rules, plan_model_config
    from trainer.plan.targets import parse_target

    config = load_run_config(None, ["model.source=llama-3-8b", "model.mesh.data=1", "model.mesh.fsdp=16",
                                    "model.mesh.tensor=4"])
    target = parse_target("tpu:v5p:4x4x4")
    rules = plan_mesh_rules(config, target.devices(), target.name)
    model = plan_model_config(config)
    states = abstract_states(config, model, rules)
    d, layers = model.hidden_size, model.num_layers
    norms = (2 * layers + 1) * d  # RMSNorm scales: only an `embed` axis, split by fsdp, whole on each tensor shard
    by_hand = (model.num_params() - norms) * 4 // (16 * 4) + norms * 4 // 16
    assert model.num_params() == 8_030_261_248
    assert per_device_bytes(states.policy.params) == by_hand
    assert per_device_bytes(states.policy.opt_state) - 2 * by_hand < 64


@pytest.mark.plan
def test_train_refuses_a_run_that_does_not_fit_before_anything_starts(tmp_path):
    """`cairl train`'s pre-flight on this machine's devices: tiny weights, but a batch of 2^18 rows."""
    import ray

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_fixtures import write_tiny_model

    from trainer.pipeline import train
    from trainer.plan.preflight import PreflightError

    model_dir = write_tiny_model(tmp_path / "model")
    config = load_run_config(TINY, [f"model.source={model_dir}", f"run.runs_dir={tmp_path}", "run.preflight=true",
                                    "run.stages=[sl]", "sl.batch_size=262144"])
    refused = r"This run does not fit local .* sft_update .* Try: .*model.remat=true.*model.lora.rank=8"
    with pytest.raises(PreflightError, match=refused):
        train(config)
    assert not ray.is_initialized()
    assert not (tmp_path / "tiny" / "config.yaml").exists()  # no run started
    assert json.loads((tmp_path / "tiny" / "plan.json").read_text())["fits"] is False


@pytest.mark.slow  # compiles the DPO and GRPO programs of the tiny model
@pytest.mark.parametrize("overrides, names", [
    (("run.stages=[dpo]", "dpo.batch_size=8"), ["dpo_update", "dpo_eval", "reference_logprobs"]),
    (("run.stages=[ppo]", "ppo.algorithm=grpo", "ppo.group.group_size=4", "ppo.batch_size=2"),
     ["group_update", "reference_logprobs", "pm_scores", "rollout_sampler"]),
])
def test_plan_covers_dpo_and_the_group_algorithms(eight_devices, overrides, names):
    """The learner programs of the routes without a preference model (dpo) and without a value model (grpo),
    compiled as their learners build them; GRPO's update holds no value model, so it needs less than PPO's."""
    from trainer.plan.planner import make_plan
    from trainer.plan.targets import parse_target

    plan = make_plan(tiny_config("model.mesh.data=-1", *overrides), parse_target("local"))
    assert [p.name for p in plan.programs] == names and plan.fits
    if "ppo.algorithm=grpo" in overrides:
        ppo = make_plan(tiny_config("model.mesh.data=-1", "run.stages=[ppo]", "ppo.batch_size=8"), parse_target("local"),
                        only=("ppo_update",))
        group_update = plan.programs[0]
        assert group_update.param_bytes + group_update.opt_state_bytes < ppo.programs[0].param_bytes + \
            ppo.programs[0].opt_state_bytes


# ----------------------------------------------------------- GRPO, DPO and LoRA counted by hand

OPTIMIZER_COUNTERS = 2 * 4  # AdamW's step count and its schedule's: two int32 scalars


def _hand_adapter_bytes(model, rank: int, fsdp: int) -> int:
    """fp32 LoRA adapters on q/k/v/o per device (models/lora.py): A carries the weight's input axes and B its
    output axes, the rank axis whole. With fsdp only: `embed` (D) split, heads and head_dim whole."""
    d, n, k, h = model.hidden_size, model.num_heads, model.num_kv_heads, model.resolved_head_dim
    q = k_ = v = rank * d // fsdp  # A: [D, R]
    per_layer = (q + rank * n * h) + (k_ + rank * k * h) + (v + rank * k * h) + (n * h * rank + rank * d // fsdp)
    return 4 * model.num_layers * per_layer


def _hand_pm_bytes(model, fsdp: int) -> int:
    """The frozen preference model: the LM backbone and a scalar head [D] split by fsdp, and a replicated bias."""
    return (model.num_params() + model.hidden_size) * 4 // fsdp + 4


@pytest.mark.plan
@pytest.mark.parametrize("lora", [(), ("model.lora.rank=2",)], ids=["full", "lora"])
def test_grpo_plan_holds_the_policy_and_frozen_models_but_no_value_model(eight_devices, lora):
    from trainer.plan.abstract import plan_model_config
    from trainer.plan.planner import make_plan
    from trainer.plan.targets import parse_target

    config = tiny_config("model.mesh.data=1", "model.mesh.fsdp=8", "run.stages=[ppo]", "ppo.algorithm=grpo",
                         "ppo.group.group_size=4", "ppo.batch_size=2", *lora)
    plan = make_plan(config, parse_target("local"))
    model = plan_model_config(config)
    weights = _hand_param_bytes(model, 8)
    assert [p.name for p in plan.programs] == ["group_update", "reference_logprobs", "pm_scores", "rollout_sampler"]
    update = plan.programs[0]
    trained = _hand_adapter_bytes(model, 2, 8) if lora else weights
    # The update's arguments are the policy alone: its weights (with LoRA the frozen base and the adapters)
    # and AdamW's two moments of what it trains; no value model anywhere.
    assert update.param_bytes == (weights + trained if lora else weights)
    assert update.opt_state_bytes == 2 * trained + OPTIMIZER_COUNTERS
    # Resident meanwhile: the frozen reference policy and preference model, nothing else.
    assert update.resident_bytes == weights + _hand_pm_bytes(model, 8)
    assert plan.fits


@pytest.mark.plan
@pytest.mark.parametrize("lora", [(), ("model.lora.rank=2",)], ids=["full", "lora"])
def test_dpo_plan_holds_the_policy_and_its_frozen_reference(eight_devices, lora):
    from trainer.plan.abstract import plan_model_config
    from trainer.plan.planner import make_plan
    from trainer.plan.targets import parse_target

    config = tiny_config("model.mesh.data=1", "model.mesh.fsdp=8", "run.stages=[dpo]", "dpo.batch_size=8", *lora)
    plan = make_plan(config, parse_target("local"))
    model = plan_model_config(config)
    weights = _hand_param_bytes(model, 8)
    trained = _hand_adapter_bytes(model, 2, 8) if lora else weights
    update, heldout, reference = plan.programs
    assert (update.name, heldout.name, reference.name) == ("dpo_update", "dpo_eval", "reference_logprobs")
    assert update.param_bytes == (weights + trained if lora else weights)
    assert update.opt_state_bytes == 2 * trained + OPTIMIZER_COUNTERS
    assert update.resident_bytes == weights  # the frozen reference
    # The reference's log-probs are computed with the policy's train state resident.
    assert reference.param_bytes == weights and reference.resident_bytes == update.param_bytes + \
        update.opt_state_bytes + 4 + 8 + 4  # step, rng key, non-finite streak
    assert plan.fits


def test_the_lora_alternative_counts_rank_8_adapters_by_hand(eight_devices):
    """What the advice's LoRA figures come from: the run's programs rebuilt with adapters, nothing compiled."""
    from trainer.plan.abstract import plan_mesh_rules, plan_model_config
    from trainer.plan.planner import LORA_RANK, lora_alternative

    config = tiny_config("model.mesh.data=1", "model.mesh.fsdp=8", "run.stages=[ppo]", "ppo.algorithm=grpo",
                         "ppo.group.group_size=4", "ppo.batch_size=2")
    model = plan_model_config(config)
    alternative = lora_alternative(config, model, plan_mesh_rules(config, eight_devices, "local", local=True))
    weights, adapters = _hand_param_bytes(model, 8), _hand_adapter_bytes(model, LORA_RANK, 8)
    assert alternative["group_update"] == (weights + adapters, 2 * adapters + OPTIMIZER_COUNTERS)
    assert alternative["reference_logprobs"] == (weights, 0)  # frozen: LoRA changes nothing


def test_the_advice_names_the_lora_override_with_its_figures():
    """No compile: a plan whose PPO update is over budget, and the same programs' states counted with LoRA."""
    from trainer.plan.advice import refusal
    from trainer.plan.planner import Plan, ProgramPlan

    gib = 1 << 30
    update = ProgramPlan(name="ppo_update", stage="ppo", shape="batch 64 × 512 tokens", param_bytes=4 * gib,
                         opt_state_bytes=8 * gib, argument_bytes=12 * gib, output_bytes=0, temp_bytes=3 * gib,
                         peak_bytes=15 * gib, resident_bytes=2 * gib, total_bytes=17 * gib, flops=1e12,
                         est_seconds=0.1, compile_seconds=1.0, compile_cpu_seconds=1.0, fits=False)
    plan = Plan(target="tpu:v5e:4x4", device="TPU v5e", devices=16, mesh={"data": 1, "fsdp": 16, "tensor": 1},
                model={"source": "x", "parameters": 1, "dtype": "bfloat16", "param_dtype": "float32", "remat": True,
                       "layers": 16, "lora": None},
                capacity_bytes=16 * gib, margin=0.1, programs=(update,),
                lora_alternative={"ppo_update": (4 * gib + gib // 4, gib // 2)})
    paragraph = refusal(plan)
    # 17 − 4 − 8 + 4.25 + 0.5 = 9.75 GiB
    assert ("model.lora.rank=8 (LoRA adapters on q/k/v/o over a frozen base: optimizer state 8.00 GiB → 0.50 GiB, "
            "about 9.75 GiB per device") in paragraph
    already = dataclasses.replace(plan, model={**plan.model, "lora": {"rank": 8}}, lora_alternative={})
    assert "model.lora" not in refusal(already)


def test_a_sampler_over_budget_on_an_fsdp_only_mesh_is_advised_tensor_parallelism():
    """No compile: the 8B GRPO sampler of docs/planning.md on v5e-16 (all figures as `cairl plan` measured them)."""
    from trainer.plan.advice import refusal
    from trainer.plan.planner import Plan, ProgramPlan

    gib = 1 << 30
    sampler = ProgramPlan(name="rollout_sampler", stage="ppo", shape="batch 64, prompt 256 + 256 new tokens",
                          param_bytes=int(1.87 * gib), opt_state_bytes=0, argument_bytes=int(1.87 * gib),
                          output_bytes=0, temp_bytes=int(13.10 * gib), peak_bytes=int(14.97 * gib),
                          resident_bytes=int(9.35 * gib), total_bytes=int(24.31 * gib), flops=3e13, est_seconds=0.64,
                          compile_seconds=1.0, compile_cpu_seconds=1.0, fits=False)
    plan = Plan(target="tpu:v5e:4x4", device="TPU v5e", devices=16, mesh={"data": 1, "fsdp": 16, "tensor": 1},
                model={"source": "llama-3-8b", "parameters": 8_030_261_248, "dtype": "bfloat16",
                       "param_dtype": "float32", "remat": True, "layers": 32, "lora": None},
                capacity_bytes=16 * gib, margin=0.1, programs=(sampler,))
    paragraph = refusal(plan)
    assert "model.mesh.tensor=4 model.mesh.fsdp=4 (the decode loop keeps every layer's weights gathered" in paragraph
    assert "rollout.batch_size or ppo.max_new_tokens smaller" in paragraph
    split = dataclasses.replace(plan, mesh={"data": 1, "fsdp": 4, "tensor": 4})
    assert "model.mesh.tensor=" not in refusal(split)  # already split by tensor parallelism
