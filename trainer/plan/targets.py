"""Hardware a plan compiles for: this process's devices, a TPU slice or a GPU cluster you do not have.

    target = parse_target("tpu:v5e:4x4")       # 16 compile-only TPU v5e devices (needs libtpu)
    target = parse_target("tpu:v5e:4x4x2slices")  # two such slices (multi-slice, DCN between them)
    target = parse_target("gpu:h100x8")        # 8 H100s (needs the CUDA plugin, installed --no-deps)
    target = parse_target("local")             # jax.devices() of this process
    devices = target.devices()

Compile-only devices come from `jax.experimental.topologies.get_topology_desc` with no accelerator
attached; XLA then compiles exactly as it would on the real chips. `KNOWN_CHIPS` holds the public
peak figures the time estimates use: estimates from data sheets, not measurements.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from pathlib import Path

from models.errors import UserError

GPU_SPECS = Path(__file__).resolve().parent / "gpu_specs"
GIB = 1 << 30


class TargetError(UserError, ValueError):
    """A target name that does not describe hardware `cairl plan` knows."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Data-sheet figures of one chip (estimates: dense bf16 matmul peak, HBM bandwidth and capacity)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int  # per chip


KNOWN_CHIPS: dict[str, ChipSpec] = {
    # TPU generation name as get_topology_desc spells it.
    "v5e": ChipSpec("TPU v5e", 197e12, 819e9, 16 * GIB),
    "v5p": ChipSpec("TPU v5p", 459e12, 2.76e12, 95 * GIB),
    "v6e": ChipSpec("TPU v6e", 918e12, 1.64e12, 32 * GIB),
    # GPU names as `gpu:<chip>x<count>` spells them; each has a spec file in gpu_specs/.
    "h100": ChipSpec("NVIDIA H100 SXM", 989e12, 3.35e12, 80 * 10**9),
    "h200": ChipSpec("NVIDIA H200 SXM", 989e12, 4.8e12, 141 * 10**9),
}
# (v4 is left out: its compile-only topology counts two devices per chip, so per-chip figures would mislead.)
TPU_CHIPS = ("v5e", "v5p", "v6e")
KNOWN_TOPOLOGIES = ("v5e:2x2", "v5e:4x4", "v5e:8x8", "v5p:4x4x4", "v5p:8x16x16", "v6e:8x8", "v6e:16x16")
GPU_CHIPS = tuple(sorted(p.stem for p in GPU_SPECS.glob("*.txtpb")))
GPUS_PER_HOST = 8

_TPU = re.compile(r"tpu:(?P<chip>[a-z0-9]+):(?P<shape>\d+(?:x\d+)*?)(?:x(?P<slices>\d+)slices)?")
_GPU = re.compile(r"gpu:(?P<chip>[a-z0-9]+)x(?P<count>\d+)")
SYNTAX = "local, tpu:<chip>:<topology>[x<N>slices] (e.g. tpu:v5e:4x4, tpu:v5p:4x4x4x2slices) or gpu:<chip>x<count> (e.g. gpu:h100x8)"


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for. `kind` is local, tpu or gpu; `chip` a KNOWN_CHIPS key (None for local)."""

    name: str
    kind: str
    chip: str | None = None
    topology: str = ""  # TPU: "4x4"; GPU: "1x<hosts>x<per host>"
    slices: int = 1
    count: int = 0  # devices (0 for local: whatever jax.devices() holds)

    @property
    def spec(self) -> ChipSpec | None:
        return KNOWN_CHIPS.get(self.chip) if self.chip else None

    def devices(self) -> list:
        """The devices to build the mesh over (compile-only ones for tpu/gpu targets)."""
        import jax

        if self.kind == "local":
            return list(jax.devices())
        from jax.experimental import topologies

        if self.kind == "tpu":
            _require("libtpu", "a TPU target needs libtpu: pip install -e '.[plan]'")
            # libtpu locks /tmp/libtpu_lockfile so one process owns the chips; compile-only use owns none.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            try:
                topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{self.chip}:{self.topology}",
                                                        num_slices=self.slices)
            except Exception as err:  # noqa: BLE001 - libtpu's own words for a shape it does not make
                raise TargetError(f"--target {self.name}: libtpu has no {self.chip} topology {self.topology!r} "
                                  f"({str(err).strip().splitlines()[0][:200]}); topologies that work: "
                                  f"{', '.join(KNOWN_TOPOLOGIES)}") from None
        else:
            _require("jax_cuda12_plugin", "a GPU target needs the CUDA plugin (no GPU needed): make plan-deps")
            text = (GPU_SPECS / f"{self.chip}.txtpb").read_text(encoding="utf-8")
            topology = topologies.get_topology_desc(platform="cuda", topology=self.topology, target_config=text)
        return list(topology.devices)

    def capacity_bytes(self, device, devices_in_use: int) -> int | None:
        """Memory one device may use: the chip's HBM, the device's own limit, or (CPU devices, which all
        share the host's RAM) RAM ÷ the devices the mesh uses."""
        if self.spec is not None:
            return self.spec.hbm_bytes
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
        if device.platform == "cpu":
            return _host_memory_bytes() // devices_in_use
        return None


def _require(module: str, advice: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TargetError(f"{advice} ({module} is not installed)")


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_target(text: str) -> Target:
    """A `--target` string as a Target; unknown chips and malformed names say what is known."""
    text = text.strip().lower()
    if text == "local":
        return Target(name="local", kind="local")
    if text.startswith("tpu:"):
        match = _TPU.fullmatch(text)
        if not match:
            raise TargetError(f"--target {text!r}: expected {SYNTAX}")
        chip = match["chip"]
        if chip not in TPU_CHIPS:
            raise TargetError(f"--target {text!r}: unknown TPU chip {chip!r}; known TPU chips: {', '.join(TPU_CHIPS)}")
        dims = [int(d) for d in match["shape"].split("x")]
        if len(dims) not in (2, 3) or min(dims) < 1:
            raise TargetError(f"--target {text!r}: a TPU topology has 2 or 3 dimensions (v5e:4x4, v5p:4x4x4)")
        slices = int(match["slices"] or 1)
        count = slices * dims[0] * dims[1] * (dims[2] if len(dims) == 3 else 1)
        return Target(name=text, kind="tpu", chip=chip, topology=match["shape"], slices=slices, count=count)
    if text.startswith("gpu:"):
        match = _GPU.fullmatch(text)
        if not match:
            raise TargetError(f"--target {text!r}: expected {SYNTAX}")
        chip, count = match["chip"], int(match["count"])
        if chip not in GPU_CHIPS:
            raise TargetError(f"--target {text!r}: unknown GPU {chip!r}; known GPUs: {', '.join(GPU_CHIPS)}")
        per_host = min(count, GPUS_PER_HOST)
        if count < 1 or count % per_host:
            raise TargetError(f"--target {text!r}: a GPU count above {GPUS_PER_HOST} must be a multiple of "
                              f"{GPUS_PER_HOST} (whole hosts)")
        return Target(name=text, kind="gpu", chip=chip, topology=f"1x{count // per_host}x{per_host}", count=count)
    raise TargetError(f"--target {text!r}: expected {SYNTAX}")
