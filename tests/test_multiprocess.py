"""Two JAX processes × 4 fake CPU devices run the sharded PPO step and the DPO reference log-probs and
match one process × 8 devices.

The same file is the worker: `python tests/test_multiprocess.py WORKER_ID PORT OUT_DIR` joins a
2-process group on 127.0.0.1 (gloo collectives), builds the (data 2, fsdp 2, tensor 2) mesh over
all 8 devices, loads only its own rows of the batch, runs one PPO step and writes the gathered
parameters and metrics (process 0), then the DPO reference's log-probs gathered to every process.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import synthetic

ROOT = Path(__file__).resolve().parent.parent
MESH = (2, 2, 2)
ROWS, LENGTH = 16, 16


def ppo_batch(seed=0):
    return synthetic.ppo_batch(ROWS, LENGTH, seed, ragged=True)


def run_ppo_step() -> dict:
    """One PPO step on the reference mesh over all (global) devices; parameters gathered to host."""
    from models.config import preset
    from models.llama import Llama, ScalarModel
    from trainer.distributed import gather_to_host, shard_global_batch
    from trainer.mesh import MeshConfig, build_mesh_rules
    from trainer.optim import OptimizerConfig
    from trainer.ppo import PPOConfig, create_ppo_state, make_ppo_step
    from trainer.state import create_train_state

    mesh_rules = build_mesh_rules(MeshConfig(*MESH))
    optimizer = OptimizerConfig(learning_rate=1e-3, eps=1e-6)
    policy = create_train_state(lambda r: Llama(preset("tiny"), r, mesh_rules), optimizer, mesh_rules, 0)
    value = create_train_state(lambda r: ScalarModel(preset("tiny"), r, mesh_rules), optimizer, mesh_rules, 1)
    config = PPOConfig(epochs=2, minibatches=2)
    state = create_ppo_state(policy, value, config.kl)
    state, metrics = make_ppo_step(state, config, mesh_rules)(state, shard_global_batch(ppo_batch(), mesh_rules))
    params = gather_to_host((state.policy.params, state.value.params))
    import jax

    flat = {f"param{i}": leaf for i, leaf in enumerate(jax.tree.leaves(params))}
    return {**flat, **{f"metric_{k}": np.asarray(v) for k, v in metrics.items()}}


def run_dpo_reference() -> np.ndarray:
    """The DPO learner's reference log-probs (trainer.dpo.reference_logprobs) of 12 rows in batches of 8 split over
    the batch shards: the last batch wraps around, and the result must come back whole on every process."""
    from models.config import preset
    from models.llama import Llama
    from trainer.dpo import make_sequence_logprob_fn, reference_logprobs
    from trainer.mesh import MeshConfig, build_mesh_rules
    from trainer.optim import OptimizerConfig
    from trainer.state import create_train_state

    mesh_rules = build_mesh_rules(MeshConfig(*MESH))
    state = create_train_state(lambda r: Llama(preset("tiny"), r, mesh_rules), OptimizerConfig(), mesh_rules, 0)
    batch = ppo_batch(seed=1)
    tokens, attention = batch["tokens_BxT"][:12], batch["attention_mask_BxT"][:12].astype(np.int32)
    loss_mask = batch["response_mask_BxT"][:12].astype(np.int32)
    return reference_logprobs(make_sequence_logprob_fn(state.graphdef, mesh_rules), state.params, tokens, attention,
                              loss_mask, 8, mesh_rules)


def _worker(process_id: int, port: int, out_dir: str) -> None:
    import jax

    from trainer.distributed import DistributedConfig, initialize

    jax.config.update("jax_default_matmul_precision", "highest")
    assert initialize(DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=process_id))
    assert jax.local_device_count() == 4 and jax.device_count() == 8
    if jax.process_index() == 0:  # the coordinator runs in process 0
        (Path(out_dir) / "listeners.txt").write_text("\n".join(_listeners(port)))
    result = run_ppo_step()
    if jax.process_index() == 0:
        np.savez(Path(out_dir) / "result.npz", **result)
    np.save(Path(out_dir) / f"dpo_reference{process_id}.npy", run_dpo_reference())
    jax.distributed.shutdown()


def _listeners(port: int) -> list[str]:
    """Local addresses (kernel hex) of the sockets listening on `port`: '0100007F' is 127.0.0.1 (IPv6 tables:
    '0000000000000000FFFF00000100007F'), all zeros is every interface."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one_process_eight_devices(eight_devices, tmp_path):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    # The JAX coordinator listened on the address the processes were given (127.0.0.1, or its IPv4-mapped IPv6
    # form), not on every interface (all zeros).
    listeners = (tmp_path / "listeners.txt").read_text().split()
    assert listeners and all(a.endswith("0100007F") for a in listeners), listeners

    reference = run_ppo_step()
    got = dict(np.load(tmp_path / "result.npz"))
    assert got.keys() == reference.keys()
    for key, want in reference.items():
        np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=0, err_msg=key)
    want = run_dpo_reference()
    for process_id in range(2):
        got = np.load(tmp_path / f"dpo_reference{process_id}.npy")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"process {process_id}")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
