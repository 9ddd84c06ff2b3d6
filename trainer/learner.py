"""Learner: the Ray actor that owns the trainable models, runs the sharded steps and checkpoints them.

One learner per run on one host (a multi-host slice runs one per host under jax.distributed; the
driver talks to process 0). The driver calls, per stage:

    learner.setup("sl")             -> {"step": k, "extras": {...}}   restores checkpoints/sl if any
    learner.set_sft_data(pairs)     learner.train_step() -> metrics   learner.save(step, extras, force)
    learner.setup("rm")             learner.set_rm_data(train, heldout)  train_step / rm_eval
    learner.setup("ppo")            learner.ppo_step(rollouts) -> metrics, learner.score(...)
    learner.publish(version)        -> WeightHandle of the current policy (object store)

Checkpoints live in <run>/checkpoints/<stage>/<step> (Orbax, trainer.checkpoint): SL holds the
policy train state, RM the preference-model state, PPO the PPOState (policy, value, KL β) plus
extras (iteration, data position, weight version, evaluation so far).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _pad_rows(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens_BxT = np.full((len(rows), length), pad_id, np.int32)
    mask_BxT = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        tokens_BxT[i, : len(row)] = row
        mask_BxT[i, : len(row)] = 1
    return tokens_BxT, mask_BxT


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


class Learner:
    """The actor body (wrap with `ray.remote`). `config` is a RunConfig, `run_dir` the run directory."""

    def __init__(self, config, run_dir: str):
        from trainer.runtime import configure_jax

        configure_jax()
        import jax

        from models.sources import load_checkpoint
        from trainer.mesh import build_mesh_rules, check_model

        self.config = config
        self.run_dir = Path(run_dir)
        mesh = config.model.mesh
        devices = jax.devices()
        if -1 not in (mesh.data, mesh.fsdp, mesh.tensor):
            devices = devices[: mesh.data * mesh.fsdp * mesh.tensor]
        self.rules = build_mesh_rules(mesh, devices)
        initial = load_checkpoint(config.model.source)
        self.model_config = initial.config.replace(dtype=config.model.dtype, attention=config.model.attention,
                                                   remat=config.model.remat, scan_layers=config.model.scan_layers)
        check_model(self.rules, self.model_config)
        self.tokenizer = initial.tokenizer
        del initial  # host weights are re-read when a stage needs them, not held for the whole run
        self.stage = None
        self.state = None
        self.ckpt = None
        self._step_fn = None
        self._data = None
        self._fns = {}

    # ---------------------------------------------------------------------------- model plumbing

    def _llama_factory(self):
        from models.llama import Llama

        return lambda rngs: Llama(self.model_config, rngs, self.rules)

    def _scalar_factory(self):
        from models.llama import ScalarModel

        return lambda rngs: ScalarModel(self.model_config, rngs, self.rules)

    def _state_from_params(self, factory, flat_params, optimizer, seed: int):
        """A train state whose parameters are `flat_params` (host numpy), created directly sharded."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from models.sources import build_module
        from trainer.optim import make_optimizer
        from trainer.state import TrainState, state_shardings

        module = build_module(lambda: factory(nnx.Rngs(0)), flat_params, self.rules, source="learner")
        graphdef, params, _ = nnx.split(module, nnx.Param, ...)
        tx = make_optimizer(optimizer)

        def init(p):
            return TrainState(params=p, opt_state=tx.init(p), step=jnp.zeros((), jnp.int32),
                              rng=jax.random.PRNGKey(seed), nonfinite_streak=jnp.zeros((), jnp.int32),
                              graphdef=graphdef, tx=tx, grad_accum_steps=optimizer.grad_accum_steps)

        return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init, params), self.rules))(params)

    def _abstract(self, factory, optimizer, seed: int):
        from trainer.state import abstract_train_state

        return abstract_train_state(factory, optimizer, self.rules, seed)

    def _checkpointer(self, stage: str):
        from trainer.checkpoint import Checkpointer

        return Checkpointer(self.run_dir / "checkpoints" / stage, self.config.checkpoint)

    def _restore_final_params(self, stage: str, abstract_state):
        """The parameters a finished stage left in checkpoints/<stage>-params (no optimizer moments:
        a third of the memory of restoring the full train state)."""
        from trainer.checkpoint import CheckpointError

        ckpt = self._checkpointer(f"{stage}-params")
        try:
            restored = ckpt.restore(abstract_state.params)
        finally:
            ckpt.close()
        if restored is None:
            raise CheckpointError(f"{self.run_dir}/checkpoints/{stage}-params holds no checkpoint; run the {stage} "
                                  f"stage first")
        return restored[0]

    def save_final_params(self) -> None:
        """At the end of a stage: its trained parameters alone, for the stages after it."""
        from trainer.checkpoint import CheckpointConfig, Checkpointer

        state = self.state.policy if self.stage == "ppo" else self.state
        ckpt = Checkpointer(self.run_dir / "checkpoints" / f"{self.stage}-params",
                            CheckpointConfig(every_steps=1, keep=1, async_save=False))
        try:
            step = int(state.step)
            if step not in ckpt.all_steps():
                ckpt.save(step, state.params, {}, force=True)
                ckpt.wait()
        finally:
            ckpt.close()

    def _initial_params(self) -> dict:
        from models.sources import load_checkpoint

        return load_checkpoint(self.config.model.source).params

    def _scalar_params_from_llama(self, llama_flat):
        """ScalarModel parameters: the LM's weights as backbone, a zero head."""
        params = {("backbone",) + tuple(p): a for p, a in llama_flat.items()}
        params[("head_D",)] = np.zeros((self.model_config.hidden_size,), np.float32)
        params[("head_bias",)] = np.zeros((), np.float32)
        return params

    def _flat(self, state) -> dict:
        import jax
        from flax import nnx

        params = getattr(state, "params", state)
        return {tuple(p): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(params)}

    def _policy_flat(self, upto: str) -> dict:
        """Policy weights entering stage `upto`: SL's final policy if the run has one, else the initial model."""
        from trainer.pipeline_state import StageRecord

        if upto in ("label", "rm", "ppo") and StageRecord(self.run_dir).done("sl"):
            abstract = self._abstract(self._llama_factory(), self.config.sl.optimizer, self.config.run.seed)
            return self._flat(self._restore_final_params("sl", abstract))
        return self._initial_params()

    # ---------------------------------------------------------------------------------- stages

    def setup(self, stage: str) -> dict:
        """Build the stage's state, continuing from its newest checkpoint if there is one."""
        import gc

        self.close()
        self.state = self._step_fn = self._data = None  # free the previous stage's arrays first
        self._fns = {}
        gc.collect()
        self.stage, seed = stage, self.config.run.seed
        self.ckpt = self._checkpointer(stage)
        if stage == "sl":
            factory, opt = self._llama_factory(), self.config.sl.optimizer
            abstract = self._abstract(factory, opt, seed)
            restored = self.ckpt.restore(abstract)
            self.state, extras = restored or (self._state_from_params(factory, self._policy_flat("sl"), opt, seed), {})
            self._build_sft()
        elif stage == "label":
            self.state, extras = None, {}
            self._label_policy = self._policy_flat("label")
        elif stage == "rm":
            factory, opt = self._scalar_factory(), self.config.rm.optimizer
            abstract = self._abstract(factory, opt, seed)
            restored = self.ckpt.restore(abstract)
            self.state, extras = restored or (
                self._state_from_params(factory, self._scalar_params_from_llama(self._initial_params()), opt, seed), {})
            self._build_rm()
        elif stage == "ppo":
            extras = self._setup_ppo()
        else:
            raise ValueError(f"unknown stage {stage!r}")
        step = int(self._step_of(self.state)) if self.state is not None else 0
        return {"step": step, "extras": extras}

    @staticmethod
    def _step_of(state) -> int:
        policy = getattr(state, "policy", state)
        return int(policy.step)

    def save(self, step: int, extras: dict | None = None, force: bool = False) -> bool:
        if step in self.ckpt.all_steps():
            return False  # a resumed stage that had already saved its final step
        saved = self.ckpt.save(step, self.state, extras or {}, force=force)
        if force:
            self.ckpt.wait()
        return saved

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.wait()
            self.ckpt.close()
            self.ckpt = None

    # ------------------------------------------------------------------------------------- SFT

    def _build_sft(self):
        from trainer.steps import make_sft_step

        self._step_fn = make_sft_step(self.state, self.rules)

    def set_sft_data(self, pairs: list[tuple[list[dict], str]]) -> int:
        """(prompt chat messages, target reply) pairs → fixed-length token rows, loss on the reply."""
        length = self.config.sl.max_seq_len
        rows, masks = [], []
        for prompt, reply in pairs:
            prompt_ids = self.tokenizer.encode_chat(prompt)
            reply_ids = self.tokenizer.encode(reply) + [self.tokenizer.eos_id]
            ids = (prompt_ids + reply_ids)[:length]
            rows.append(ids)
            masks.append(([0] * len(prompt_ids) + [1] * len(reply_ids))[:length])
        tokens, attention = _pad_rows(rows, length, self.tokenizer.pad_id)
        loss = np.zeros_like(attention)
        for i, m in enumerate(masks):
            loss[i, : len(m)] = m
        self._data = {"tokens_BxT": tokens, "attention_mask_BxT": attention, "loss_mask_BxT": loss}
        return len(rows)

    def train_step(self) -> dict:
        """One SFT or RM update on the next batch (batch k = rows k·B … k·B+B−1, wrapping): the data
        position is the step counter, so a resumed run continues where it stopped."""
        import jax

        batch_size = self.config.sl.batch_size if self.stage == "sl" else self.config.rm.batch_size
        data = self._data if self.stage == "sl" else self._rm_train
        n = len(next(iter(data.values())))
        step = self._step_of(self.state)
        rows = [(step * batch_size + i) % n for i in range(batch_size)]
        batch = {k: v[rows] for k, v in data.items()}
        start = time.perf_counter()
        self.state, metrics = self._step_fn(self.state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    # -------------------------------------------------------------------------------------- RM

    def _build_rm(self):
        from trainer.steps import make_rm_step

        self._step_fn = make_rm_step(self.state, self.rules)

    def _pair_arrays(self, labels: list[dict]) -> dict:
        length = self.config.rm.max_seq_len
        from trainer.prompts import prompt_messages

        chosen, rejected, p = [], [], []
        for label in labels:
            prompt_ids = self.tokenizer.encode_chat(prompt_messages(label["prompt"]))
            a = prompt_ids + self.tokenizer.encode(label["response_a"]) + [self.tokenizer.eos_id]
            b = prompt_ids + self.tokenizer.encode(label["response_b"]) + [self.tokenizer.eos_id]
            chosen.append(a)
            rejected.append(b)
            p.append(float(label["p_a"]))
        ct, cm = _pad_rows(chosen, length, self.tokenizer.pad_id)
        rt, rm = _pad_rows(rejected, length, self.tokenizer.pad_id)
        return {"chosen_tokens_BxT": ct, "chosen_mask_BxT": cm, "rejected_tokens_BxT": rt, "rejected_mask_BxT": rm,
                "p_chosen_B": np.asarray(p, np.float32)}

    def set_rm_data(self, train: list[dict], heldout: list[dict]) -> tuple[int, int]:
        self._rm_train = self._pair_arrays(train)
        self._rm_heldout = self._pair_arrays(heldout)
        return len(train), len(heldout)

    def rm_eval(self) -> dict:
        """Held-out accuracy (the PM prefers the side the AI label prefers), Bradley–Terry loss with the
        soft labels, and the mean score margin:  loss = −[p·log σ(Δ) + (1−p)·log σ(−Δ)], Δ = r_a − r_b."""
        data = self._rm_heldout
        chosen = self._scores_of(data["chosen_tokens_BxT"], data["chosen_mask_BxT"])
        rejected = self._scores_of(data["rejected_tokens_BxT"], data["rejected_mask_BxT"])
        p = data["p_chosen_B"]
        margin = chosen - rejected
        decided = p != 0.5
        # A tie (equal scores, e.g. the untrained zero head) counts as half right, like a coin flip.
        agree = np.where(margin == 0, 0.5, ((margin > 0) == (p > 0.5)).astype(np.float64))
        accuracy = float(np.mean(agree[decided])) if decided.any() else float("nan")
        loss = -(p * -np.logaddexp(0, -margin) + (1 - p) * -np.logaddexp(0, margin))
        return {"accuracy": accuracy, "bt_loss": float(np.mean(loss)), "score_margin": float(np.mean(margin)),
                "pairs": int(len(p))}

    def _scores_of(self, tokens_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
        """Scores of the current preference model, in fixed-size batches (padded rows dropped)."""
        import jax

        from trainer.steps import sequence_scores

        if "rm_scores" not in self._fns:
            self._fns["rm_scores"] = jax.jit(lambda state, t, m: sequence_scores(state.model(), t, m))
        fn, batch_size, n = self._fns["rm_scores"], self.config.rm.batch_size, len(tokens_BxT)
        out = []
        for start in range(0, n, batch_size):
            rows = np.arange(start, start + batch_size) % n
            out.append(np.asarray(jax.device_get(fn(self.state, tokens_BxT[rows], mask_BxT[rows]))))
        return np.concatenate(out)[:n]

    # ------------------------------------------------------------------------------------- PPO

    def _setup_ppo(self) -> dict:
        import jax
        from flax import nnx

        from models.sources import build_module
        from trainer import ppo
        from trainer.ppo import PPOState, create_ppo_state, make_ppo_step, make_token_fn
        from trainer.steps import sequence_scores

        cfg, seed = self.config.ppo, self.config.run.seed
        policy_flat = self._policy_flat("ppo")
        rm_abstract = self._abstract(self._scalar_factory(), self.config.rm.optimizer, seed)
        rm_flat = self._flat(self._restore_final_params("rm", rm_abstract))
        # Frozen models: reference policy (the PPO starting point) and the preference model.
        self._ref = build_module(lambda: self._llama_factory()(nnx.Rngs(0)), policy_flat, self.rules)
        self._pm = build_module(lambda: self._scalar_factory()(nnx.Rngs(0)), rm_flat, self.rules)

        policy_abs = self._abstract(self._llama_factory(), cfg.policy_optimizer, seed)
        value_abs = self._abstract(self._scalar_factory(), cfg.value_optimizer, seed + 1)
        beta_abs = jax.ShapeDtypeStruct((), np.float32, sharding=jax.sharding.NamedSharding(
            self.rules.mesh, jax.sharding.PartitionSpec()))
        restored = self.ckpt.restore(PPOState(policy=policy_abs, value=value_abs, beta=beta_abs))
        if restored is not None:
            self.state, extras = restored
        else:
            policy = self._state_from_params(self._llama_factory(), policy_flat, cfg.policy_optimizer, seed)
            value_init = rm_flat if cfg.value_from == "reward_model" else self._scalar_params_from_llama(policy_flat)
            del policy_flat
            value = self._state_from_params(self._scalar_factory(), value_init, cfg.value_optimizer, seed + 1)
            del value_init
            self.state, extras = create_ppo_state(policy, value, cfg.update.kl), {}
        self._step_fn = make_ppo_step(self.state, cfg.update, self.rules)
        self._values_fn = make_token_fn(self.state.value, self.rules, "values")
        ref_graph, ref_params = nnx.split(self._ref)
        pm_graph, pm_params = nnx.split(self._pm)
        self._ref_params, self._pm_params = ref_params, pm_params
        self._ref_logprobs = jax.jit(lambda p, t, m: ppo.token_logprobs(nnx.merge(ref_graph, p), t, m))
        self._pm_scores = jax.jit(lambda p, t, m: sequence_scores(nnx.merge(pm_graph, p), t, m))
        return extras

    def _sequence_arrays(self, prompt_ids: list[list[int]], response_ids: list[list[int]]):
        """Right-padded prompt+response rows of one fixed length (one compile), and the response mask."""
        max_prompt = self.config.data.max_prompt_tokens
        length = _round_up(max_prompt + max(self.config.ppo.max_new_tokens, self.config.ppo.eval_max_new_tokens))
        rows, response_masks, offsets = [], [], []
        for p, r in zip(prompt_ids, response_ids):
            p = p[-max_prompt:]
            rows.append(p + r)
            offsets.append(len(p))
            response_masks.append([0] * len(p) + [1] * len(r))
        tokens, attention = _pad_rows(rows, length, self.tokenizer.pad_id)
        response_mask = np.zeros_like(attention)
        for i, m in enumerate(response_masks):
            response_mask[i, : len(m)] = m[:length]
        return tokens, attention, response_mask, offsets

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """Preference-model score of each (prompt, response)."""
        import jax

        tokens, attention, _, _ = self._sequence_arrays(prompt_ids, response_ids)
        return [float(s) for s in jax.device_get(self._pm_scores(self._pm_params, tokens, attention))]

    def ppo_step(self, rollouts: list[dict]) -> dict:
        """One PPO iteration's learner side: scores, reference log-probs, values, then the update."""
        import jax

        timings = {}
        t0 = time.perf_counter()
        prompts = [r["prompt_ids"] for r in rollouts]
        responses = [r["response_ids"] for r in rollouts]
        tokens, attention, response_mask, offsets = self._sequence_arrays(prompts, responses)
        old_logprobs = np.zeros(tokens.shape, np.float32)
        for i, (r, off) in enumerate(zip(rollouts, offsets)):
            lp = np.asarray(r["logprobs"], np.float32)[: tokens.shape[1] - off]
            old_logprobs[i, off: off + len(lp)] = lp
        scores = jax.device_get(self._pm_scores(self._pm_params, tokens, attention))
        ref = jax.device_get(self._ref_logprobs(self._ref_params, tokens, attention))
        values = jax.device_get(self._values_fn(self.state.value, tokens, attention))
        timings["score_seconds"] = time.perf_counter() - t0
        batch = {"tokens_BxT": tokens, "attention_mask_BxT": attention, "response_mask_BxT": response_mask,
                 "old_logprobs_BxT": old_logprobs, "ref_logprobs_BxT": np.asarray(ref, np.float32),
                 "old_values_BxT": np.asarray(values, np.float32), "scores_B": np.asarray(scores, np.float32)}
        t1 = time.perf_counter()
        self.state, metrics = self._step_fn(self.state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timings["update_seconds"] = time.perf_counter() - t1
        metrics.update(timings)
        metrics["reward_mean"] = float(np.mean(scores))
        metrics["reward_std"] = float(np.std(scores))
        metrics["scores"] = [float(s) for s in scores]
        return metrics

    # ------------------------------------------------------------------------------ weights out

    def publish(self, version: int):
        """The current policy's weights in the object store, as `version`."""
        from trainer.weights import publish

        if self.stage == "label":
            flat = self._label_policy
        elif self.stage == "ppo":
            flat = self._flat(self.state.policy)
        elif self.stage == "sl":
            flat = self._flat(self.state)
        else:
            flat = self._policy_flat("ppo")
        return publish(version, flat)

    def export(self, out: str) -> str:
        """Write the final policy as a Hugging Face directory."""
        from models.export import export_params

        if self.stage == "ppo" and self.state is not None:
            flat = self._flat(self.state.policy)
        else:
            flat = self._policy_flat("ppo")
        return str(export_params(out, self.model_config.replace(dtype="float32"), flat, self.tokenizer))
