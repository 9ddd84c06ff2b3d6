"""The interface of a stage learner, and the pieces the step-driven ones share.

A stage learner owns one stage's state, jitted step and data. The actor (trainer/learner.py) makes
one per `setup(stage)` and forwards the driver's calls to it; a call the stage has no use for raises
`StageCallError` naming both. Subclasses override what their stage does:

    setup() -> StageStart          build or restore the state
    set_data(data) -> int          the stage's training data (typed: see trainer/learners/requests.py)
    train_step(batch) -> Metrics   one update (SFT/RM draw their batch from the data; PPO gets rollouts)
    evaluate(pairs) -> Metrics     held-out evaluation (or of the given pairs)
    score(prompts, responses)      preference-model scores
    policy_params() -> nnx.State   the policy workers should sample from (published by the actor)
    finish()                       the stage is done: hand its weights on to later stages
"""

from __future__ import annotations

import time

import numpy as np
from flax import nnx

from models.errors import UserError
from trainer.distributed import gather_to_host, put_batch
from trainer.learners.context import LearnerContext
from trainer.learners.requests import Metrics, StageStart


class StageCallError(UserError, RuntimeError):
    """The driver called something the current stage does not do (a bug in a stage's driver code)."""


class StageLearner:
    stage = ""  # the run.stages name, set by each subclass

    def __init__(self, ctx: LearnerContext):
        self.ctx = ctx
        self.config = ctx.config
        self.state = None  # the stage's pytree of arrays (TrainState, PPOState), None for state-less stages
        self.ckpt = ctx.checkpointer(self.stage)

    def _unsupported(self, call: str):
        raise StageCallError(f"the {self.stage} stage's learner has no {call}()")

    def setup(self) -> StageStart:
        return StageStart(step=0, extras={})

    def set_data(self, data) -> int:
        self._unsupported("set_data")

    def train_step(self, batch=None) -> Metrics:
        self._unsupported("train_step")

    def evaluate(self, pairs=None) -> Metrics:
        self._unsupported("evaluate")

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        self._unsupported("score")

    def policy_params(self) -> nnx.State:
        """By default the policy this stage started from (SL's, or the initial model)."""
        return self.ctx.policy_params()

    def finish(self) -> None:
        """Nothing to hand on by default."""

    # ------------------------------------------------------------------------------ checkpoints

    def step(self) -> int:
        return 0

    def save(self, step: int, extras: dict, force: bool) -> bool:
        if self.state is None or step in self.ckpt.all_steps():
            return False  # nothing to save, or a resumed stage that had already saved its final step
        saved = self.ckpt.save(step, self.state, extras, force=force)
        if force:
            self.ckpt.wait()
        return saved

    def close(self) -> None:
        self.ckpt.wait()
        self.ckpt.close()


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The data rows of update `step`: positions step·B … step·B+B−1 of the passes over the data, each
    pass (epoch) in its own order drawn from (seed, epoch). Stage data arrive in blocks by source
    (revision pairs, then contrast pairs; revised prompts, then answered ones), and without a shuffle
    a model learns whichever block it saw last. A function of the step counter only, so a resumed run
    (and every process of a multi-host learner) draws the same batches."""
    rows, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        rows.append(int(orders[epoch][offset]))
    return rows


class SupervisedLearner(StageLearner):
    """A stage that updates one `TrainState` on rows of fixed training data (SFT, the preference model).

    Batches are drawn by `batch_rows`: every row once per epoch, in a seeded order per epoch; the data
    position is the step counter, so a resumed run continues where it stopped.
    """

    batch_size = 1  # rows per update, set from the stage's config

    def __init__(self, ctx: LearnerContext):
        super().__init__(ctx)
        self.data: dict[str, np.ndarray] = {}
        self._step_fn = None

    def restore_or(self, factory, optimizer, fresh_params) -> StageStart:
        """The newest checkpoint of this stage, else a fresh state around `fresh_params()`."""
        seed = self.config.run.seed
        restored = self.ckpt.restore(self.ctx.abstract_state(factory, optimizer, seed))
        if restored is not None:
            self.state, extras = restored
        else:
            self.state, extras = self.ctx.train_state(factory, fresh_params(), optimizer, seed), {}
        return StageStart(step=self.step(), extras=extras)

    def step(self) -> int:
        return int(self.state.step)

    def train_step(self, batch=None) -> Metrics:
        if batch is not None:
            raise StageCallError(f"the {self.stage} learner draws its batches from set_data(); train_step takes none")
        n = len(next(iter(self.data.values())))
        rows = batch_rows(self.step(), self.batch_size, n, self.config.run.seed)
        start = time.perf_counter()
        self.state, metrics = self._step_fn(self.state, put_batch({k: v[rows] for k, v in self.data.items()},
                                                                  self.ctx.rules))
        metrics = {k: float(v) for k, v in gather_to_host(metrics).items()}
        metrics["seconds"] = time.perf_counter() - start
        return metrics


class PairLearner(SupervisedLearner):
    """A supervised stage on labelled preference pairs (the preference model, DPO): training rows and
    held-out rows built by `_pair_arrays`, held-out sums from `self._eval_fn` combined by `_eval_metrics`."""

    def __init__(self, ctx: LearnerContext):
        super().__init__(ctx)
        self.heldout: dict[str, np.ndarray] = {}
        self._eval_fn = None

    def _pair_arrays(self, pairs) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _eval_metrics(self, sums: list[dict]) -> Metrics:
        raise NotImplementedError

    def set_data(self, data) -> int:
        """`data` is a trainer.learners.requests.PreferenceData."""
        self.data = self._pair_arrays(data.train)
        self.heldout = self._pair_arrays(data.heldout)
        return len(data.train)

    def evaluate(self, pairs=None) -> Metrics:
        """Metrics on `pairs` (PreferencePairs), by default the held-out set, in batches of the training
        batch size; the last batch is filled by wrapping, its extra rows masked (`valid_B`)."""
        rows_by_key = self.heldout if pairs is None else self._pair_arrays(tuple(pairs))
        n = len(rows_by_key["p_chosen_B"])
        sums = []
        for start in range(0, n, self.batch_size):
            rows = np.arange(start, start + self.batch_size)
            batch = {k: v[rows % n] for k, v in rows_by_key.items()}
            batch["valid_B"] = (rows < n).astype(np.float32)
            sums.append(gather_to_host(self._eval_fn(self.state, put_batch(batch, self.ctx.rules))))
        return self._eval_metrics(sums)


def pad_rows(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [len(rows), length] int32 tokens (rows cut to `length`) and their 0/1 mask."""
    tokens_BxT = np.full((len(rows), length), pad_id, np.int32)
    mask_BxT = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        tokens_BxT[i, : len(row)] = row
        mask_BxT[i, : len(row)] = 1
    return tokens_BxT, mask_BxT
