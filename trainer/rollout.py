"""RolloutWorker: a Ray actor holding a policy copy, its sampler and tokenizer; runs one task at a time.

A task names a kind, a batch of prompt uids with their texts, the weight version to use and the
kind's settings, typed (the config classes the run config validated):

    Task(kind="rollout", uids=(...), texts=(...), weights=WeightHandle(3, ref), seed=...,
         settings=RolloutSettings(SamplingParams(max_new_tokens=32, temperature=1.0), max_prompt_tokens=96))

The worker first brings its policy to that version (fetching from the object store only on a
change), then runs the whole batch at that version — a batch never mixes versions — and returns
`TaskResult(version, records={uid: record})`. Kinds:
  rollout  one sampled response per prompt: token ids and behaviour log-probs (PPO)   RolloutSettings
  group    group_size sampled responses per prompt, one record holding them all (GRPO/RLOO)  RolloutSettings
  sl       SL-CAI: answer, then rounds of critique → revision (trainer.critique)      CritiqueConfig
  label    two responses per prompt, scored by the feedback model (trainer.feedback)  FeedbackConfig
  reply    greedy chat replies (evaluation)                                          eval.workers.ReplySettings
  options  log-probs of option continuations, by the policy or the judge (evaluation) eval.workers.OptionSettings

The worker holds no run state: a restarted worker (Ray `max_restarts`) rebuilds itself from the
constructor arguments and is brought to the right weights by its next task.

With `rollout.colocated` the same class runs inside the learner process (`RolloutWorker(config, 0,
live=LiveWeights)`, made by trainer/learner.py): its tasks are learner calls, and its weights are the
learner's own arrays of the version each task names (trainer.weights.LiveWeights) instead of copies
fetched from the object store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

from trainer.weights import WeightHandle

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How a rollout task samples: the sampling parameters, and the prompt context the learner trains on."""

    sampling: Any  # models.sampling.SamplingParams
    max_prompt_tokens: int | None = None  # keep the last this many prompt tokens (None: all)
    group_size: int = 1  # responses per prompt of a `group` task


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # rollout | group | sl | label | reply | options
    uids: tuple[str, ...]
    texts: tuple[str, ...]  # the user prompt of each uid
    weights: WeightHandle
    seed: int  # sampling seed of this batch (task_seed)
    settings: Any = None  # RolloutSettings | trainer.critique.CritiqueConfig | trainer.feedback.FeedbackConfig


@dataclasses.dataclass
class TaskResult:
    version: int  # weight version the whole batch was produced with
    records: dict[str, dict]  # uid -> record (JSON-serialisable)
    worker: str = ""
    seconds: float = 0.0
    tokens: int = 0  # generated tokens
    sync_seconds: float = 0.0  # of `seconds`: bringing the policy to the task's weight version (0: had it)


def task_seed(run_seed: int, stage: str, uids: Sequence[str], version: int) -> int:
    """A seed fixed by what is asked, not by who runs it: a re-dispatched batch samples the same way."""
    key = f"{run_seed}\0{stage}\0{version}\0" + "\0".join(uids)
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


class RolloutWorker:
    """The actor body (wrap with `ray.remote`, see `trainer.pipeline`). `config` is a RunConfig."""

    def __init__(self, config, index: int, live=None):
        """`live` (trainer.weights.LiveWeights): run colocated in the learner process, on its arrays."""
        self.config = config
        self.index = index
        self.name = "learner" if live is not None else f"worker-{index}"
        self._live = live
        self._policy = None
        self._feedback = None
        self._judge = None
        self._scorers: dict[str, Any] = {}  # "policy" | "feedback" | "judge" -> LlamaOptionScorer
        self._weights = None
        self._constitution = None

    # ------------------------------------------------------------------------------ lazy pieces

    def _ensure_policy(self):
        if self._policy is None:
            from trainer.runtime import configure_jax

            configure_jax()
            from trainer.policy import Policy
            from trainer.weights import WeightCache

            self._policy = Policy.load(self.config.model.source, self.config.model.dtype)
            model = self._policy.model
            self._weights = WeightCache(model) if self._live is None else self._live.attach(model)
        return self._policy

    def _ensure_feedback(self):
        if self._feedback is None:
            from trainer.policy import Policy

            source = self.config.model.feedback_source or self.config.model.source
            self._feedback = Policy.load(source, self.config.model.dtype)
        return self._feedback

    def _ensure_judge(self):
        """The evaluation judge (eval.judge, default the run's base model); the feedback model when they are one."""
        source = self.config.eval.judge or self.config.model.source
        if source == (self.config.model.feedback_source or self.config.model.source):
            return self._ensure_feedback()
        if self._judge is None:
            from trainer.policy import Policy

            self._judge = Policy.load(source, self.config.model.dtype)
        return self._judge

    def _scorer(self, name: str, policy):
        """An option scorer over `policy`'s model, following its weights (the policy's change per version)."""
        from trainer.feedback import LlamaOptionScorer

        if name not in self._scorers:
            self._scorers[name] = LlamaOptionScorer(policy.model, policy.tokenizer)
        elif name == "policy":
            self._scorers[name].update_weights(policy.model)
        return self._scorers[name]

    def _constitution_obj(self):
        if self._constitution is None:
            from trainer.constitution import load_constitution

            self._constitution = load_constitution(self.config.constitution)
        return self._constitution

    def ping(self) -> str:
        return f"{self.name} pid {os.getpid()}"

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------------------------ tasks

    def run(self, task: Task) -> TaskResult:
        start = time.perf_counter()
        policy = self._ensure_policy()
        sync_start = time.perf_counter()
        state = self._weights.state_for(task.weights)
        if state is not None:
            from flax import nnx

            policy.sampler.update_weights(state)
            nnx.update(policy.model, state)  # the model scores (options tasks) at the same version it samples
        sync_seconds = time.perf_counter() - sync_start if state is not None else 0.0
        version = self._weights.version
        handler = getattr(self, f"_run_{task.kind}", None)
        if handler is None:
            raise ValueError(f"unknown task kind {task.kind!r}")
        records, tokens = handler(policy, task)
        for record in records.values():
            record.setdefault("version", version)
        return TaskResult(version=version, records=records, worker=self.name,
                          seconds=time.perf_counter() - start, tokens=tokens, sync_seconds=sync_seconds)

    def _run_rollout(self, policy, task: Task):
        settings: RolloutSettings = task.settings
        # The learner keeps the last max_prompt_tokens of each prompt; sampling must see the same context,
        # or the behaviour log-probs would not belong to the sequences PPO trains on.
        keep = settings.max_prompt_tokens
        prompts = [policy.chat_ids(t)[-keep:] if keep else policy.chat_ids(t) for t in task.texts]
        samples = policy.sampler.generate(prompts, settings.sampling, seed=task.seed)
        records = {}
        for row, uid in enumerate(task.uids):
            n = int(samples.lengths[row])
            response = samples.tokens[row, :n].tolist()
            records[uid] = {
                "prompt_ids": prompts[row],
                "response_ids": response,
                "logprobs": samples.policy_logprobs[row, :n].astype(float).tolist(),
                "response": policy.tokenizer.decode(response),
            }
        return records, int(samples.lengths.sum())

    def _run_group(self, policy, task: Task):
        """G samples of each prompt in one batch (rows i·G … i·G+G−1; each row draws its own random stream),
        returned as one record per prompt uid: the ledger completes the whole group at once, and the task's
        single weight version is every response's."""
        settings: RolloutSettings = task.settings
        keep, group = settings.max_prompt_tokens, settings.group_size
        prompts = [policy.chat_ids(t)[-keep:] if keep else policy.chat_ids(t) for t in task.texts]
        samples = policy.sampler.generate([p for p in prompts for _ in range(group)], settings.sampling, seed=task.seed)
        records = {}
        for i, uid in enumerate(task.uids):
            rows = range(i * group, (i + 1) * group)
            responses = [samples.tokens[r, : int(samples.lengths[r])].tolist() for r in rows]
            records[uid] = {
                "prompt_ids": prompts[i],
                "group_response_ids": responses,
                "group_logprobs": [samples.policy_logprobs[r, : int(samples.lengths[r])].astype(float).tolist()
                                   for r in rows],
                "group_responses": [policy.tokenizer.decode(ids) for ids in responses],
            }
        return records, int(samples.lengths.sum())

    def _run_sl(self, policy, task: Task):
        from models.sampling import SamplingParams
        from trainer.critique import CritiqueConfig, SamplerTextGenerator, run_sl_cai
        from trainer.data.records import Prompt

        config: CritiqueConfig = task.settings
        generator = SamplerTextGenerator(policy.sampler, policy.tokenizer,
                                         SamplingParams(max_new_tokens=1, temperature=config.temperature), seed=task.seed)
        # Principles and few-shot examples are drawn from (run seed, uid): the same whichever batch a uid lands in.
        prompts = [Prompt(uid=u, text=t) for u, t in zip(task.uids, task.texts)]
        records = run_sl_cai(prompts, self._constitution_obj(), generator, config, seed=self.config.run.seed)
        return {r.uid: r.to_json() for r in records}, 0

    def _run_label(self, policy, task: Task):
        from models.sampling import SamplingParams
        from trainer.critique import SamplerTextGenerator
        from trainer.feedback import FeedbackConfig, ResponsePair, label_pairs

        config: FeedbackConfig = task.settings
        a, tokens_a = policy.respond(list(task.texts), config.max_new_tokens, config.temperature, task.seed,
                                     top_p=config.top_p)
        b, tokens_b = policy.respond(list(task.texts), config.max_new_tokens, config.temperature, task.seed + 1,
                                     top_p=config.top_p)
        judge = self._ensure_feedback()
        scorer = self._scorer("feedback", judge)
        generator = None
        if config.chain_of_thought:
            generator = SamplerTextGenerator(judge.sampler, judge.tokenizer,
                                             SamplingParams(max_new_tokens=1, temperature=0.0), seed=task.seed)
        pairs = [ResponsePair(uid, text, ra, rb) for uid, text, ra, rb in zip(task.uids, task.texts, a, b)]
        records = label_pairs(pairs, self._constitution_obj(), scorer, config, generator,
                              seed=self.config.run.seed)
        return {r.uid: r.to_json() for r in records}, tokens_a + tokens_b

    def _run_reply(self, policy, task: Task):
        replies, tokens = policy.respond(list(task.texts), task.settings.max_new_tokens, temperature=0.0,
                                         seed=task.seed)
        return {uid: {"reply": reply} for uid, reply in zip(task.uids, replies)}, tokens

    def _run_options(self, policy, task: Task):
        settings = task.settings
        model = self._ensure_judge() if settings.target == "judge" else policy
        name = "policy" if model is policy else "feedback" if model is self._feedback else "judge"
        scorer = self._scorer(name, model)  # the judge shares the feedback model's scorer (and compiled programs)
        logprobs = scorer.score(list(task.texts), [list(settings.options[uid]) for uid in task.uids])
        return {uid: {"logprobs": row.astype(float).tolist()} for uid, row in zip(task.uids, logprobs)}, 0


def worker_options(config) -> dict[str, Any]:
    """Ray actor options of a rollout worker."""
    from trainer.config import ray_resource_options

    return {"num_cpus": config.rollout.num_cpus, "max_restarts": config.rollout.max_restarts,
            "max_task_retries": 0, "max_concurrency": 1,
            **ray_resource_options(config.rollout.resources, config.rollout.memory_fraction)}
