"""The run config of `cairl train`: one typed tree composing every stage's settings.

    config = load_run_config("configs/demo.yaml", ["ppo.iterations=4", "run.stages=[sl,label]"])

Each section is a frozen dataclass validating itself in `__post_init__`; unknown keys are rejected
by `trainer.configlib` with the file, line and closest matches. The worker-side settings are the
classes the workers use (`sl` ⊇ trainer.critique.CritiqueConfig, `label` = trainer.feedback.
FeedbackConfig), so every rule of theirs is checked here, at load. Loading starts neither a JAX
backend nor Ray: a bad config must fail before either starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from models.config import AttentionImpl
from models.lora import LoraConfig
from models.sampling import SamplingParams
from models.errors import UserError
from trainer import configlib
from trainer.checkpoint import CheckpointConfig
from trainer.critique import CritiqueConfig
from trainer.dpo import DPOConfig
from trainer.eval.config import EvalConfig
from trainer.feedback import FeedbackConfig
from trainer.grpo import GroupConfig
from trainer.kl import KLConfig
from trainer.mesh import MeshConfig
from trainer.optim import OptimizerConfig
from trainer.ppo import PPOConfig

STAGES = ("sl", "label", "dpo", "rm", "ppo")
Stage = Literal["sl", "label", "dpo", "rm", "ppo"]
DEFAULT_STAGES = ("sl", "label", "rm", "ppo")
RL_STAGES = ("ppo", "dpo")  # alternative ways to the RL policy: on-policy RL on a preference model, or DPO on the labels


def rl_stage(stages) -> str:
    """The stage whose policy is the run's RL policy (the `rl` evaluation point, the export): dpo or ppo."""
    return "dpo" if "dpo" in stages else "ppo"


class RunConfigError(UserError, ValueError):
    """A run config whose values cannot work together."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "smollm2-135m-instruct"  # initial policy: registry name, HF directory, .gguf file or run dir
    feedback_source: str = ""  # AI-feedback model; empty = the initial policy, frozen
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (fp32 on CPU, bf16 on accelerators)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # learner mesh (rollout workers: one device)
    # Learner-side full-sequence attention: "cudnn" is cuDNN's fused kernel (NVIDIA GPUs, bfloat16).
    attention: AttentionImpl = "xla"
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, ~⅓ more FLOPs)
    scan_layers: bool = False  # run the blocks under lax.scan (deep models compile much faster; see models/config.py)
    # LoRA adapters on the frozen model for every training stage ({rank, alpha, dropout, targets}; see
    # models/lora.py); absent: full fine-tuning.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if not self.source:
            raise RunConfigError("model.source must name a model")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise RunConfigError("model.attention: cudnn needs model.dtype: bfloat16")


@dataclasses.dataclass(frozen=True)
class DataSection:
    prompts: tuple[str, ...] = ("default:red_team_train", "default:helpful_train")  # prompt sets, interleaved
    eval_prompts: tuple[str, ...] = ("default:red_team_heldout",)  # held-out prompts for before/after evaluation
    data_dir: str = ""  # TFDS build directory; empty = $CAIRL_CACHE/tfds
    sl_prompts: int = 16  # prompts used by SL-CAI
    label_prompts: int = 16  # prompts for AI-feedback pairs
    ppo_prompts: int = 16  # prompts PPO cycles over
    eval_count: int = 8  # held-out prompts for evaluation
    max_prompt_tokens: int = 96  # chat-rendered prompt tokens a prompt may have, in every stage
    long_prompts: Literal["truncate", "reject"] = "truncate"  # a longer prompt: keep its end, or refuse the run
    # Shorter prompt sets repeat until the longest is used up, so every stage's slice keeps the mix
    # (48 helpful prompts beside 3,000 red-team ones would otherwise all land in the first slice).
    cycle_sets: bool = False
    # Prompt sets the RL stage (PPO / GRPO) draws its data.ppo_prompts from instead of data.prompts, interleaved
    # the same way; in each set the prompts SL-CAI and labelling did not use come first. Empty: the next slice of
    # data.prompts. Use it to train RL on requests SL-CAI never fine-tuned on (docs/recipe.md, runs 10-11).
    ppo_sets: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.prompts or not self.eval_prompts:
            raise RunConfigError("data.prompts and data.eval_prompts must each name at least one prompt set")
        for name in ("sl_prompts", "label_prompts", "ppo_prompts", "eval_count", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise RunConfigError(f"data.{name} must be ≥ 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class SLSection(CritiqueConfig):
    """SL-CAI: the critique settings workers receive (trainer.critique.CritiqueConfig), then fine-tuning."""

    # Prompt sets (their source names, e.g. "helpful_train") answered but not critiqued: the answers join
    # the SFT data unchanged, so fine-tuning on revisions does not teach refusing everything (the paper
    # mixes helpful samples into SL-CAI the same way).
    helpful_sources: tuple[str, ...] = ()

    sft_steps: int = 8  # SFT updates on the final revisions
    batch_size: int = 4  # SFT batch (sequences)
    max_seq_len: int = 192  # SFT sequences are cut to this many tokens
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-5, decay="constant", total_steps=1000))

    def __post_init__(self):
        super().__post_init__()
        if self.sft_steps < 0 or self.batch_size < 1 or self.max_seq_len < 2:
            raise RunConfigError("sl: sft_steps ≥ 0, batch_size ≥ 1 and max_seq_len ≥ 2 expected")


@dataclasses.dataclass(frozen=True)
class LabelSection(FeedbackConfig):
    """AI feedback: the labelling settings workers receive (trainer.feedback.FeedbackConfig), and where pairs come from."""

    # sampled: two samples per prompt, labelled by the feedback model (the paper);
    # revisions: SL-CAI's (final revision, initial answer) pairs, the revision preferred with
    # probability revision_p -- the constitution-guided revision did the judging (no feedback model).
    pairs: Literal["sampled", "revisions"] = "sampled"
    revision_p: float = 0.9  # soft label of the revision in `revisions` pairs (conservative, not 1)
    # revisions only: which (revision, answer) pairs to keep. all: every changed answer; declines: only those
    # whose revision refuses or redirects and whose answer does not (phrase classifier), so each pair
    # teaches "decline this request" and none teaches answering a harmful one.
    revision_filter: Literal["all", "declines"] = "all"
    # revisions only: each helpful answer (sl.helpful_sources) also preferred to a written refusal (p = revision_p)
    refusal_contrast: bool = False
    # with refusal_contrast: also a written refusal preferred to each harmful request's answer that complies,
    # as many such pairs as benign contrast pairs (both capped to the smaller count), so a written refusal
    # is as often preferred as rejected and only the request tells the preference model which applies.
    harmful_contrast: bool = False
    # with refusal_contrast: also benign answers preferred to the model's own declines (SL-CAI revisions that
    # declined a harmful request), as many as the revision pairs that prefer those declines. PPO samples the
    # policy's way of declining, not the written refusals: without these pairs run 5's preference model
    # rewarded it on benign requests too, and PPO raised over-refusal 13 points over SL (docs/recipe.md).
    own_declines: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.5 < self.revision_p <= 1.0:
            raise RunConfigError(f"label.revision_p must be in (0.5, 1], got {self.revision_p}")
        revision_only = {"refusal_contrast": self.refusal_contrast, "harmful_contrast": self.harmful_contrast,
                         "own_declines": self.own_declines, "revision_filter": self.revision_filter != "all"}
        for key, set_ in revision_only.items():
            if set_ and self.pairs != "revisions":
                raise RunConfigError(f"label.{key} shapes the pairs of label.pairs: revisions; with pairs: sampled "
                                     "the feedback model labels every pair")
        if self.harmful_contrast and not self.refusal_contrast:
            raise RunConfigError("label.harmful_contrast mirrors label.refusal_contrast's pairs (a written refusal "
                                 "preferred on harmful requests, rejected on benign ones); set refusal_contrast: true")
        if self.own_declines and not self.refusal_contrast:
            raise RunConfigError("label.own_declines pairs the benign answers of label.refusal_contrast with the "
                                 "model's own declines; set refusal_contrast: true")


@dataclasses.dataclass(frozen=True)
class RMSection:
    steps: int = 16  # preference-model updates
    batch_size: int = 4  # pairs per update
    heldout_fraction: float = 0.25  # labelled pairs kept out of training for accuracy
    max_seq_len: int = 160  # prompt + response tokens per side
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=2e-5, decay="constant", total_steps=1000))
    human_pairs: str = ""  # hh-rlhf helpful-base style .jsonl.gz blended into PM training (the CAI paper); "" = none
    human_pairs_count: int = 256  # how many of its pairs (the first ones)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or not 0.0 < self.heldout_fraction < 1.0:
            raise RunConfigError("rm: steps ≥ 0, batch_size ≥ 1 and heldout_fraction in (0, 1) expected")
        if self.human_pairs and (self.human_pairs_count < 1 or not Path(self.human_pairs).expanduser().is_file()):
            raise RunConfigError(f"rm.human_pairs {self.human_pairs!r}: expected an existing hh-rlhf style .jsonl[.gz] "
                                 f"file and rm.human_pairs_count ≥ 1 (got {self.human_pairs_count})")


@dataclasses.dataclass(frozen=True)
class DPOSection(DPOConfig):
    """DPO / IPO of the SL policy straight on the AI labels (trainer/dpo.py): no preference model, no sampling."""

    steps: int = 16  # updates
    batch_size: int = 4  # pairs per update
    heldout_fraction: float = 0.25  # labelled pairs kept out of training for implicit-reward accuracy
    max_seq_len: int = 160  # prompt + response tokens per side
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=5e-6, decay="constant", total_steps=1000))

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0 or self.batch_size < 1 or not 0.0 < self.heldout_fraction < 1.0 or self.max_seq_len < 2:
            raise RunConfigError("dpo: steps ≥ 0, batch_size ≥ 1, heldout_fraction in (0, 1) and max_seq_len ≥ 2 "
                                 "expected")


@dataclasses.dataclass(frozen=True)
class PPOSection:
    # The RL stage's algorithm: ppo (value model, GAE) or, without a value model, grpo / rloo on groups of
    # `group.group_size` responses per prompt (trainer/grpo.py)
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    iterations: int = 8  # rollout → update cycles
    batch_size: int = 8  # prompts per iteration (ppo: one response each; grpo/rloo: a group each)
    max_new_tokens: int = 32  # response budget per rollout
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_max_new_tokens: int = 48  # greedy responses for the before/after evaluation
    update: PPOConfig = dataclasses.field(default_factory=lambda: PPOConfig(kl=KLConfig(kind="fixed", beta=0.05)))
    policy_optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-5, decay="constant", total_steps=1000))
    value_optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=5e-5, decay="constant", total_steps=1000))
    value_from: Literal["reward_model", "policy"] = "reward_model"  # value model initialisation
    group: GroupConfig = dataclasses.field(default_factory=GroupConfig)  # grpo / rloo settings (the update's too)

    def __post_init__(self):
        if self.iterations < 0 or self.batch_size < 1 or self.eval_max_new_tokens < 1:
            raise RunConfigError("ppo: iterations ≥ 0, batch_size ≥ 1 and eval_max_new_tokens ≥ 1 expected")
        self.sampling()  # raises on a setting that describes no distribution

    @property
    def grouped(self) -> bool:
        """Groups of responses per prompt and no value model (grpo, rloo)?"""
        return self.algorithm != "ppo"

    def sampling(self) -> SamplingParams:
        """How rollout workers sample PPO's responses."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p)


_RAY_NAMES = {"cpu": "CPU", "gpu": "GPU", "tpu": "TPU", "memory": "memory"}


def check_resources(section: str, resources: dict, cpu_key: str) -> None:
    """Ray resources one actor asks for: GPU / TPU / memory (bytes) or a custom resource, amounts > 0.
    CPUs have their own key (`cpu_key`), so one setting is not made twice."""
    for name, amount in resources.items():
        key = f"{section}.resources.{name}"
        if name.lower() == "cpu":
            raise configlib.FieldError("resources", f"{key}: set the CPU share with {cpu_key}, not in resources")
        if name.lower() in _RAY_NAMES and name != _RAY_NAMES[name.lower()]:
            raise configlib.FieldError("resources", f"{key}: Ray's resource is named {_RAY_NAMES[name.lower()]!r} "
                                                    f"(an actor asking for {name!r} would wait forever)")
        if not amount > 0:
            raise configlib.FieldError("resources", f"{key}: expected an amount > 0, got {amount}")
        if name == "GPU" and amount > 1 and amount != int(amount):
            raise configlib.FieldError("resources", f"{key}: more than one GPU must be a whole number, got {amount}")


def ray_resource_options(resources: dict, memory_fraction: float | None = None) -> dict:
    """Ray actor options for `resources` (validated by check_resources); with a GPU, the share of its memory
    JAX may take in the actor's process (`memory_fraction`, see gpu_memory_fraction)."""
    options, custom = {}, {}
    for name, amount in resources.items():
        if name == "GPU":
            options["num_gpus"] = amount
            fraction = gpu_memory_fraction(amount, memory_fraction)
            if fraction is not None:  # Ray merges these variables into the job's
                options["runtime_env"] = {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}"}}
        elif name == "memory":
            options["memory"] = amount
        else:
            custom[name] = amount
    if custom:
        options["resources"] = custom
    return options


JAX_GPU_MEMORY_FRACTION = 0.75  # what JAX preallocates of a GPU's memory in a process when nothing says otherwise


def gpu_memory_fraction(gpu_share: float, memory_fraction: float | None) -> float | None:
    """XLA_PYTHON_CLIENT_MEM_FRACTION of a process holding `gpu_share` of a GPU: the configured fraction, else
    for a fraction of a GPU that fraction of its memory less 10 % for CUDA's own use (JAX's default 75 % in two
    processes sharing one GPU would not both start), else None (JAX's default)."""
    if memory_fraction is not None:
        return memory_fraction
    return 0.9 * gpu_share if gpu_share < 1 else None


def check_memory_fraction(section: str, memory_fraction: float | None, resources: dict) -> None:
    if memory_fraction is None:
        return
    if not 0 < memory_fraction <= 1:
        raise configlib.FieldError("memory_fraction", f"{section}.memory_fraction: expected a fraction in (0, 1], "
                                                      f"got {memory_fraction}")
    if "GPU" not in resources:
        raise configlib.FieldError("memory_fraction", f"{section}.memory_fraction sets the share of a GPU's memory "
                                                      f"JAX takes in the process, but {section}.resources asks for no "
                                                      f"GPU (e.g. {{GPU: 0.5}})")


@dataclasses.dataclass(frozen=True)
class LearnerSection:
    """The learner processes: one per host. More than one joins them into one JAX job (jax.distributed)
    whose mesh (model.mesh) spans every device of every host; each runs on its own Ray node."""

    hosts: int = 1  # learner processes, one per Ray node (a multi-host TPU slice: its hosts)
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # per learner, e.g. {GPU: 8} or {TPU: 4}
    head_resource: str = ""  # a resource only learner 0's node has (a TPU slice: "TPU-v4-16-head")
    coordinator_port: int = 0  # jax.distributed coordinator port on learner 0's node; 0 = a free one
    join_timeout_s: float = 300.0  # how long the hosts may take to be scheduled and to join the JAX job
    memory_fraction: float | None = None  # of its GPU's memory JAX takes per learner (XLA_PYTHON_CLIENT_MEM_FRACTION); None: 0.9 × a GPU share < 1, else JAX's 75 %

    def __post_init__(self):
        if self.hosts < 1:
            raise configlib.FieldError("hosts", f"learner.hosts must be ≥ 1, got {self.hosts}")
        if not 0 <= self.coordinator_port < 65536:
            raise configlib.FieldError("coordinator_port", f"learner.coordinator_port must be in 0..65535, got "
                                                           f"{self.coordinator_port}")
        if self.join_timeout_s <= 0:
            raise configlib.FieldError("join_timeout_s", f"learner.join_timeout_s must be > 0, got {self.join_timeout_s}")
        check_resources("learner", self.resources, "ray.learner_num_cpus")
        check_memory_fraction("learner", self.memory_fraction, self.resources)


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    """Who samples, critiques and labels: RolloutWorker actors (separate processes, sent each weight version
    through the object store), or with `colocated` the learner process itself, on its devices, reading its
    parameters in place (one accelerator host: no weight copy, no second process holding device memory)."""

    colocated: bool = False  # run every rollout task inside the learner process (needs num_workers: 0, learner.hosts: 1)
    num_workers: int = 1  # RolloutWorker actors (0 with colocated)
    batch_size: int = 8  # prompt uids per worker task
    max_staleness: int = 1  # results sampled more than this many weight versions ago are dropped
    task_timeout_s: float = 600.0  # a task running longer marks its worker hung: killed, restarted, re-dispatched
    max_restarts: int = 3  # Ray restarts of a dead worker
    num_cpus: float = 0.5  # Ray CPU share per worker (fractional: whole CPUs starve 2-core machines)
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # per worker, e.g. {GPU: 0.5}
    memory_fraction: float | None = None  # of its GPU's memory JAX takes per worker (XLA_PYTHON_CLIENT_MEM_FRACTION); None: 0.9 × a GPU share < 1, else JAX's 75 %

    def __post_init__(self):
        if self.num_workers < 0 or self.batch_size < 1 or self.max_staleness < 0:
            raise RunConfigError("rollout: num_workers ≥ 0, batch_size ≥ 1 and max_staleness ≥ 0 expected")
        if self.task_timeout_s <= 0 or self.max_restarts < 0 or self.num_cpus <= 0:
            raise RunConfigError("rollout: task_timeout_s > 0, max_restarts ≥ 0 and num_cpus > 0 expected")
        check_resources("rollout", self.resources, "rollout.num_cpus")
        check_memory_fraction("rollout", self.memory_fraction, self.resources)
        if self.colocated and self.num_workers:
            raise configlib.FieldError("num_workers", f"rollout.colocated: true runs the rollout tasks in the learner "
                                                      f"process and starts no rollout workers: set "
                                                      f"rollout.num_workers: 0 (got {self.num_workers})")
        if self.colocated and (self.resources or self.memory_fraction is not None):
            key = "resources" if self.resources else "memory_fraction"
            raise configlib.FieldError(key, f"rollout.colocated: true starts no rollout workers, so rollout.{key} "
                                            f"applies to nothing; the learner process's learner.{key} does")
        if not self.colocated and self.num_workers == 0:
            raise configlib.FieldError("num_workers", "rollout.num_workers: 0 leaves nothing to sample with; start "
                                                      "≥ 1 workers, or set rollout.colocated: true to sample in the "
                                                      "learner process")


def check_gpu_memory_split(learner: LearnerSection, rollout: RolloutSection) -> None:
    """Processes holding a fraction of a GPU may be placed on one GPU by Ray (their shares summing to ≤ 1):
    the memory JAX takes in them must fit that GPU together. At most one learner is on a node; of the
    workers, as many as fit beside it (or alone) by their GPU shares."""
    eps = 1e-9
    share_l, share_w = learner.resources.get("GPU"), rollout.resources.get("GPU") if rollout.num_workers else None
    fraction_l = share_l and (gpu_memory_fraction(share_l, learner.memory_fraction) or JAX_GPU_MEMORY_FRACTION)
    fraction_w = share_w and (gpu_memory_fraction(share_w, rollout.memory_fraction) or JAX_GPU_MEMORY_FRACTION)

    def workers_beside(room: float) -> int:
        return min(rollout.num_workers, int(room / share_w + eps)) if share_w and share_w < 1 else 0

    groups = []  # (learner on it, workers on it) of the fullest GPUs possible
    if share_l and share_l < 1:
        groups.append((True, workers_beside(1 - share_l)))
    if share_w and share_w < 1:
        groups.append((False, workers_beside(1.0)))
    for with_learner, workers in groups:
        total = (fraction_l if with_learner else 0.0) + workers * fraction_w
        if total > 1 + eps:
            learner_part = (f"the learner ({share_l:g} GPU, memory fraction {fraction_l:.3f}: learner.memory_fraction) "
                            f"and " if with_learner else "")
            raise configlib.FieldError(
                "rollout", f"GPU memory split: one GPU may hold {learner_part}{workers} rollout worker(s) "
                           f"({share_w:g} GPU each, memory fraction {fraction_w:.3f}: rollout.memory_fraction), "
                           f"{total:.3f} of its memory in all > 1; lower learner.memory_fraction / "
                           f"rollout.memory_fraction so that they sum to at most 1")


@dataclasses.dataclass(frozen=True)
class RaySection:
    address: str | None = None  # None: start a local cluster; "auto" or host:port joins one
    host: str = "127.0.0.1"  # local cluster binds here only
    dashboard: bool = False  # start the dashboard (local cluster)
    num_cpus: int | None = None  # local cluster CPUs (default: the machine's)
    learner_num_cpus: float = 0.5  # Ray CPU share of the learner actor
    learner_timeout_s: float = 3600.0  # longest one learner call may run (start, first compiles included); then it is stopped
    temp_dir: str = ""  # Ray session files; empty = <run dir>/ray is too long for sockets, so /tmp/cairl-ray-<name>

    def __post_init__(self):
        if self.learner_timeout_s <= 0:
            raise RunConfigError(f"ray.learner_timeout_s must be > 0, got {self.learner_timeout_s}")


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str = "demo"  # run directory is <runs_dir>/<name>
    runs_dir: str = "runs"
    seed: int = 0
    stages: tuple[Stage, ...] = DEFAULT_STAGES  # which stages to run, in this order
    export: bool = True  # write hf/ with the final policy
    max_nonfinite_updates: int = 5  # stop (checkpoint saved) after this many updates in a row were skipped as non-finite
    preflight: bool = True  # before Ray starts: compile the learner's steps for its devices, refuse what will not fit

    def __post_init__(self):
        if self.max_nonfinite_updates < 1:
            raise RunConfigError(f"run.max_nonfinite_updates must be ≥ 1, got {self.max_nonfinite_updates}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name) or set(self.name) == {"."}:
            # '.' and '..' would make the run directory runs_dir itself or its parent.
            raise RunConfigError(f"run.name {self.name!r}: expected a plain directory name of letters, digits, '.', "
                                 f"'_' and '-' (not '.' or '..')")
        order = [STAGES.index(s) for s in self.stages]
        if not self.stages or order != sorted(set(order)):
            raise RunConfigError(f"run.stages must be a non-empty subset of {list(STAGES)} in that order, "
                                 f"got {list(self.stages)}")
        if set(RL_STAGES) <= set(self.stages):
            raise RunConfigError(f"run.stages: ppo and dpo are two ways to the RL policy; choose one, got "
                                 f"{list(self.stages)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    constitution: str = "default"  # YAML file, CAI-paper JSON directory, or a shipped name
    data: DataSection = dataclasses.field(default_factory=DataSection)
    sl: SLSection = dataclasses.field(default_factory=SLSection)
    label: LabelSection = dataclasses.field(default_factory=LabelSection)
    rm: RMSection = dataclasses.field(default_factory=RMSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # suites on base, SL and RL policies
    learner: LearnerSection = dataclasses.field(default_factory=LearnerSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    ray: RaySection = dataclasses.field(default_factory=RaySection)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every_steps=4, keep=2))
    run: RunSection = dataclasses.field(default_factory=RunSection)

    def __post_init__(self):
        if self.rollout.colocated and self.learner.hosts > 1:
            raise configlib.FieldError("rollout", f"rollout.colocated: true samples inside the one learner process of "
                                                  f"a single-host run, but learner.hosts = {self.learner.hosts}: a "
                                                  f"learner group samples on rollout workers (rollout.colocated: "
                                                  f"false, rollout.num_workers ≥ 1)")
        check_gpu_memory_split(self.learner, self.rollout)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Parse a run config file plus `key=value` overrides; errors name the file, line and key."""
    return configlib.load(RunConfig, path, overrides)


# Whole-word key names only: `auth_token` is a secret, `max_new_tokens` is not.
_SECRET = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)


def redacted(data):
    """A copy of a plain config dict with the values of secret-looking keys replaced."""
    if isinstance(data, dict):
        return {k: ("<redacted>" if _SECRET.search(str(k)) and v not in (None, "") else redacted(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    if isinstance(data, str) and "://" in data and "@" in data:
        # user:password@host in a URL
        return re.sub(r"://[^/@]*@", "://<redacted>@", data)
    return data


def to_yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(redacted(configlib.to_dict(config)), sort_keys=False)

