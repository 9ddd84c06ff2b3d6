"""Starting the learner processes of a run: one Ray actor, or one per host joined into one JAX job.

    handles = start_learners(config, run_dir)      # [learner 0, learner 1, ...]; the driver calls them all

`learner.hosts: 1` is the single-host learner: one actor (with `learner.resources`, e.g. {GPU: 1}).
With more hosts the driver reserves one Ray node per learner (a placement group, one bundle per
node, STRICT_SPREAD; bundle 0 also takes `learner.head_resource`, the resource only worker 0 of a
TPU slice has), asks learner 0's node for its address and a free port, and starts one learner per
bundle, each calling `jax.distributed.initialize` with that coordinator (trainer/distributed.py).
Every learner then builds the same global mesh over all hosts' devices and runs the same jitted
steps: the driver's calls fan out to all of them (trainer/health.py), and their results agree.

A node that never comes (too few nodes with the resources, a host that does not join the JAX job)
stops the run with a LearnerGroupError within `learner.join_timeout_s`, before any stage starts.
"""

from __future__ import annotations

import socket
from pathlib import Path

from models.errors import UserError
from trainer.config import RunConfig, ray_resource_options


class LearnerGroupError(UserError, RuntimeError):
    """The learner hosts could not be reserved or did not join."""


def learner_options(config: RunConfig) -> dict:
    """Ray actor options of one learner (no restarts: a restarted learner would hold no state)."""
    return {"num_cpus": config.ray.learner_num_cpus, "max_restarts": 0,
            **ray_resource_options(config.learner.resources, config.learner.memory_fraction)}


def bundles(config: RunConfig) -> list[dict]:
    """One placement-group bundle per learner host: its CPUs and resources (and the head resource for host 0)."""
    per_host = {"CPU": config.ray.learner_num_cpus, **config.learner.resources}
    out = [dict(per_host) for _ in range(config.learner.hosts)]
    if config.learner.head_resource:
        out[0][config.learner.head_resource] = 1
    return out


def _coordinator_address(port: int) -> str:
    """Runs on learner 0's node: its Ray node address and a port free there (or the configured one)."""
    import ray

    host = ray.util.get_node_ip_address()
    if not port:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    return f"{host}:{port}"


def start_learners(config: RunConfig, run_dir: Path) -> list:
    import ray

    from trainer.learner import Learner

    actor = ray.remote(Learner)
    if config.learner.hosts == 1:
        return [actor.options(**learner_options(config)).remote(config, str(run_dir.absolute()))]

    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from trainer.distributed import DistributedConfig

    hosts, timeout = config.learner.hosts, config.learner.join_timeout_s
    group = placement_group(bundles(config), strategy="STRICT_SPREAD", name=f"cairl-learners-{config.run.name}")
    if not group.wait(timeout_seconds=timeout):
        ray.util.remove_placement_group(group)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        raise LearnerGroupError(
            f"learner.hosts = {hosts} needs {hosts} Ray nodes, each with {bundles(config)[-1]} free (node 0 also "
            f"{config.learner.head_resource or 'nothing more'}); after {timeout:g} s (learner.join_timeout_s) the "
            f"cluster ({nodes} live node(s)) could not give them. Start Ray on every host first (launch/), or lower "
            f"learner.hosts")

    def on(bundle: int) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)}

    coordinator = ray.get(ray.remote(_coordinator_address).options(num_cpus=0, **on(0)).remote(
        config.learner.coordinator_port))
    return [actor.options(**learner_options(config), **on(i)).remote(
        config, str(run_dir.absolute()),
        DistributedConfig(coordinator=coordinator, num_processes=hosts, process_id=i, timeout_s=int(timeout)))
        for i in range(hosts)]
