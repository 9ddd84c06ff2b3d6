"""Orbax checkpoints: exact resume after SIGKILL mid-save, corrupt-step fallback, restore onto another mesh.

The same file is the training worker for the kill test:
`python tests/test_checkpoint.py RUN_DIR TOTAL_STEPS KILL_AT` trains a tiny PPO policy + value on a
deterministic data stream (batch k is a function of k), checkpointing every 2 steps; with
KILL_AT > 0 it SIGKILLs itself inside the async save of that step, after the arrays are written and
before Orbax commits the step (the rename of its temporary directory): the latest point a kill can cut
a save off, reached every time whatever the machine's load.
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import synthetic

ROOT = Path(__file__).resolve().parent.parent
MESH = (2, 2, 2)
ROWS, LENGTH = 8, 12


def data_batch(position: int) -> dict:
    return synthetic.ppo_batch(ROWS, LENGTH, seed=position, response_start=5)


def _train(run_dir: Path, total_steps: int, kill_at: int) -> None:
    import jax

    from models.config import preset
    from models.llama import Llama, ScalarModel
    from trainer.checkpoint import CheckpointConfig, Checkpointer
    from trainer.mesh import MeshConfig, build_mesh_rules
    from trainer.optim import OptimizerConfig
    from trainer.ppo import PPOConfig, abstract_ppo_state, create_ppo_state, make_ppo_step
    from trainer.state import abstract_train_state, create_train_state

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh_rules = build_mesh_rules(MeshConfig(*MESH))
    optimizer = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, total_steps=10)
    policy_factory = lambda r: Llama(preset("tiny"), r, mesh_rules)  # noqa: E731
    value_factory = lambda r: ScalarModel(preset("tiny"), r, mesh_rules)  # noqa: E731
    config = PPOConfig(epochs=1, minibatches=2, kl=PPOConfig().kl.__class__(kind="adaptive", target=0.05, horizon=100))

    if kill_at:
        _kill_before_commit(kill_at)
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig(every_steps=2, keep=2))
    abstract = abstract_ppo_state(abstract_train_state(policy_factory, optimizer, mesh_rules, 0),
                                  abstract_train_state(value_factory, optimizer, mesh_rules, 1))
    restored = ckpt.restore(abstract)
    if restored is None:
        state = create_ppo_state(create_train_state(policy_factory, optimizer, mesh_rules, 0),
                                 create_train_state(value_factory, optimizer, mesh_rules, 1), config.kl)
        position = 0
    else:
        state, extras = restored
        position = extras["data_position"]
        print(f"resumed at data position {position}", flush=True)
    step = make_ppo_step(state, config, mesh_rules)
    while position < total_steps:
        state, metrics = step(state, data_batch(position))
        position += 1
        ckpt.save(position, state, {"data_position": position})
    ckpt.save(position, state, {"data_position": position}, force=True)
    ckpt.close()
    leaves = jax.tree.leaves((state.policy.params, state.value.params, state.policy.opt_state, state.beta,
                              state.policy.rng))
    np.savez(run_dir / "final.npz", *[np.asarray(x) for x in leaves])


def _kill_before_commit(step: int) -> None:
    """The fault injector: SIGKILL this process when Orbax's background thread is about to commit `step`."""
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self):
        if self._final_path.name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


def _run_worker(run_dir: Path, total: int, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, __file__, str(run_dir), str(total), str(kill_at)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_during_async_save_then_resume_is_bit_identical(tmp_path):
    straight = _run_worker(tmp_path / "straight", total=6)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _run_worker(tmp_path / "resumed", total=6, kill_at=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # The kill cut step 4's write off: only Orbax's temporary directory exists for it.
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert (checkpoints / "2").is_dir() and not (checkpoints / "4").exists(), sorted(p.name for p in checkpoints.iterdir())
    assert any(p.name.startswith("4.orbax-checkpoint-tmp") for p in checkpoints.iterdir()), list(checkpoints.iterdir())
    resumed = _run_worker(tmp_path / "resumed", total=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at data position 2" in resumed.stdout, resumed.stdout

    want = np.load(tmp_path / "straight" / "final.npz")
    got = np.load(tmp_path / "resumed" / "final.npz")
    assert len(want.files) == len(got.files) > 40
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ------------------------------------------------------------------------- in-process checkpoint tests


def _sft_state(mesh_shape, seed=0, abstract_only=False):
    import jax

    from models.config import preset
    from models.llama import Llama
    from trainer.mesh import MeshConfig, build_mesh_rules
    from trainer.optim import OptimizerConfig
    from trainer.state import abstract_train_state, create_train_state

    mesh_rules = build_mesh_rules(MeshConfig(*mesh_shape), devices=jax.devices()[: int(np.prod(mesh_shape))])
    factory = lambda r: Llama(preset("tiny"), r, mesh_rules)  # noqa: E731
    abstract = abstract_train_state(factory, OptimizerConfig(), mesh_rules, seed)
    return None if abstract_only else create_train_state(factory, OptimizerConfig(), mesh_rules, seed), abstract


def _assert_same(a, b):
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_newest_checkpoint_falls_back_to_previous(eight_devices, tmp_path, caplog):
    from trainer.checkpoint import CheckpointConfig, Checkpointer

    first, abstract = _sft_state((2, 2, 2), seed=0)
    second, _ = _sft_state((2, 2, 2), seed=1)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep=3))
    ckpt.save(1, first, {"data_position": 10})
    ckpt.save(2, second, {"data_position": 20})
    ckpt.wait()
    # Damage only the array data of step 2 (its metadata stays valid JSON).
    data_files = [p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, sorted(str(p) for p in (tmp_path / "2").rglob("*"))
    for path in data_files:
        path.write_bytes(b"\0garbage" * 7)

    ckpt.close()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"), Checkpointer(tmp_path) as reader:
        state, extras = reader.restore(abstract)
        assert reader.all_steps() == [1]
    assert extras == {"data_position": 10}
    _assert_same(state, first)
    assert "step 2 failed to restore" in caplog.text
    moved = [p.name for p in tmp_path.iterdir() if p.name.startswith("corrupt-2-")]
    assert len(moved) == 1 and (tmp_path / moved[0] / "state").is_dir()  # kept, never deleted


def test_restore_onto_another_mesh_asserts_shardings(eight_devices, tmp_path):
    from trainer.checkpoint import CheckpointConfig, CheckpointError, Checkpointer, assert_shardings

    state, _ = _sft_state((2, 2, 2))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1))
    ckpt.save(3, state, {"data_position": 3})
    ckpt.close()
    for shape in [(1, 8, 1), (8, 1, 1), (1, 1, 1)]:
        _, abstract = _sft_state(shape, abstract_only=True)
        with Checkpointer(tmp_path) as reader:
            restored, extras = reader.restore(abstract)
        _assert_same(restored, state)
        embed = restored.params["embed_VxD"][...]
        assert embed.sharding.mesh.shape == dict(zip(("data", "fsdp", "tensor"), shape))
    # A state restored on one mesh is not accepted as laid out for another.
    _, other = _sft_state((1, 8, 1), abstract_only=True)
    with pytest.raises(CheckpointError, match="sharding"):
        assert_shardings(state, other)


def test_fresh_directory_restores_none_and_periodic_saves(eight_devices, tmp_path):
    from trainer.checkpoint import CheckpointConfig, Checkpointer

    state, abstract = _sft_state((8, 1, 1))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=3, keep=2))
    assert ckpt.restore(abstract) is None
    started = [step for step in range(1, 10) if ckpt.save(step, state, {"data_position": step})]
    assert started == [3, 6, 9]
    assert ckpt.save(9, state, force=True) is False  # the final step was already a periodic one
    ckpt.wait()
    assert ckpt.all_steps() == [6, 9]  # keep=2
    assert ckpt.restore(abstract)[1] == {"data_position": 9}
    ckpt.close()


if __name__ == "__main__":
    _train(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


def test_a_changed_state_layout_is_a_clear_error_and_nothing_is_moved(tmp_path):
    """Resuming with max_grad_norm: null drops the clip's state from the optimizer tree: a config change,
    not corruption, so every checkpoint stays where it is."""
    import jax
    import jax.numpy as jnp

    from trainer.checkpoint import CheckpointConfig, Checkpointer, CheckpointLayoutError
    from trainer.optim import OptimizerConfig, make_optimizer

    params = {"w_DxF": jnp.ones((4, 8)), "scale_D": jnp.ones(4)}

    def state(max_grad_norm):
        return {"params": params, "opt_state": make_optimizer(OptimizerConfig(max_grad_norm=max_grad_norm)).init(params)}

    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep=3)) as ckpt:
        ckpt.save(1, state(1.0), {"iteration": 1})
        ckpt.save(2, state(1.0), {"iteration": 2})
    changed = jax.eval_shape(lambda: state(None))
    with Checkpointer(tmp_path) as reader, pytest.raises(CheckpointLayoutError) as err:
        reader.restore(changed)
    message = str(err.value)
    assert "another state layout" in message and "in the checkpoint only: opt_state.1.0.count" in message, message
    assert "max_grad_norm" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing renamed, nothing deleted
    with Checkpointer(tmp_path) as reader:  # the original setting still resumes from the newest step
        _, extras = reader.restore(jax.eval_shape(lambda: state(1.0)))
    assert extras == {"iteration": 2}
