"""<run>/report.md and plots/: what the run did and whether it worked, from the run's own files.

Sections: the evaluation of the base, SL and RL policies (eval/, one table with CIs and deltas vs
base, then its plot); stage wall times; SL-CAI critiques and revisions grouped by principle; AI
labels; the preference model's held-out accuracy; DPO's implicit-reward accuracy per step; PPO reward
and KL per iteration (plots/ppo.png); the mean preference-model reward of greedy answers to held-out
prompts before and after PPO.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from trainer import topology
from trainer.ledger import read_records
from trainer.pipeline_state import StageRecord


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_ppo(run_dir: Path, records: list[dict]) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_r.plot(steps, [r.get("ppo/reward_mean") for r in records], marker="o")
    ax_r.set(title="PM reward of rollouts", xlabel="PPO iteration", ylabel="mean score")
    ax_k.plot(steps, [r.get("ppo/kl") for r in records], marker="o", color="tab:red")
    ax_k.set(title="KL(policy ‖ reference)", xlabel="PPO iteration", ylabel="nats / sequence")
    fig.tight_layout()
    out = Path(run_dir) / "plots" / "ppo.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _sl_section(run_dir: Path, per_principle: int = 2) -> list[str]:
    records = read_records(run_dir / "samples" / "sl.jsonl")
    if not records:
        return []
    lines = ["## SL-CAI: critiques and revisions", "", f"{len(records)} prompts. Examples per principle:", ""]
    by_principle = defaultdict(list)
    for r in records:
        for rnd in r.get("rounds", []):
            by_principle[rnd.get("principle_id", "?")].append((r, rnd))
    for principle in sorted(by_principle):
        lines += [f"### principle `{principle}`", ""]
        for r, rnd in by_principle[principle][:per_principle]:
            lines += [f"- **prompt:** {_short(r['prompt'], 200)}",
                      f"  - **initial answer:** {_short(r.get('initial_response', ''))}",
                      f"  - **critique:** {_short(rnd.get('critique', ''))}",
                      f"  - **revision:** {_short(rnd.get('revision', ''))}", ""]
    return lines


def _by_source(info: dict) -> str:
    parts = [f"{source} {v['accuracy']:.3f} ({v['pairs']} pairs)" for source, v in info["heldout_accuracy_by_source"].items()]
    return "- held-out accuracy by pair source: " + ", ".join(parts)


def _source_counts(stages: dict) -> str:
    counts = stages.get("label", {}).get("pairs_by_source") or {}
    return " (" + ", ".join(f"{source} {n}" for source, n in sorted(counts.items())) + ")" if counts else ""


def _label_section(run_dir: Path, stages: dict) -> list[str]:
    labels = read_records(run_dir / "samples" / "labels.jsonl")
    if not labels:
        return []
    p = [float(r["p_a"]) for r in labels]
    lines = ["## AI feedback and preference model", "",
             f"{len(labels)} labelled pairs{_source_counts(stages)}; mean P(A preferred) = {sum(p) / len(p):.3f}; "
             f"confident labels (|p − 0.5| > 0.1): {sum(abs(x - 0.5) > 0.1 for x in p)}.", ""]
    rm = stages.get("rm", {})
    if "heldout_accuracy" in rm:
        lines += [f"- preference model held-out accuracy: **{rm['heldout_accuracy']:.3f}** "
                  f"(before training {rm.get('heldout_accuracy_before', float('nan')):.3f}; chance 0.5) on "
                  f"{rm.get('heldout_pairs')} held-out pairs, trained on {rm.get('train_pairs')}"]
        lines += [_by_source(rm), ""] if rm.get("heldout_accuracy_by_source") else [""]
    example = labels[0]
    lines += ["Example label:", "", f"- prompt: {_short(example['prompt'], 200)}",
              f"- (A) {_short(example['response_a'], 200)}", f"- (B) {_short(example['response_b'], 200)}",
              f"- P(A) = {float(example['p_a']):.3f}, principles {example.get('principle_ids')}", ""]
    return lines


def _ppo_section(run_dir: Path, stages: dict, metrics: list[dict]) -> list[str]:
    ppo = [r for r in metrics if r.get("stage") == "ppo"]
    info = stages.get("ppo", {})
    if not ppo and "pm_reward_before" not in info:
        return []
    algorithm = info.get("algorithm", "ppo").upper()
    lines = [f"## RL-CAI ({algorithm})", ""]
    if "pm_reward_after" in info:
        delta = info["pm_reward_after"] - info["pm_reward_before"]
        lines += [f"Mean preference-model reward of greedy answers to held-out prompts: before PPO "
                  f"**{info['pm_reward_before']:.4f}**, after PPO **{info['pm_reward_after']:.4f}** "
                  f"(change {delta:+.4f}).", ""]
    if ppo:
        last = ppo[-1]
        # β is PPO's KL-penalty coefficient; GRPO and RLOO put a fixed KL term in the loss and log none.
        beta = f"β {last['ppo/beta']:.4f}, " if "ppo/beta" in last else ""
        lines += [f"Final iteration: KL {last.get('ppo/kl', float('nan')):.4f} nats/sequence, {beta}"
                  f"entropy {last.get('ppo/entropy', float('nan')):.3f}, "
                  f"stale results dropped {info.get('stale_dropped', 0)}, worker deaths {info.get('worker_deaths', 0)}.",
                  "", "![reward and KL](plots/ppo.png)", ""]
        if "ppo/degenerate_groups" in last:  # grpo / rloo
            degenerate = sum(r.get("ppo/degenerate_groups", 0) for r in ppo)
            lines += [f"Groups whose responses all scored the same (zero advantage, nothing learned): "
                      f"{degenerate:.0f} over {len(ppo)} iterations.", ""]
        lines += ["| iteration | reward mean | reward std | KL | β | clip frac | approx KL | value loss | expl. var | "
                  "resp. len | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ppo:
            cols = [r.get(f"ppo/{k}") for k in ("reward_mean", "reward_std", "kl", "beta", "clip_fraction",
                                                 "approx_kl", "value_loss", "explained_variance",
                                                 "response_length", "tokens_per_s")]
            lines.append(f"| {r['step']} | " + " | ".join("—" if c is None else f"{c:.4g}" for c in cols) + " |")
        lines.append("")
    before = {r["uid"]: r for r in read_records(run_dir / "samples" / "eval_before.jsonl")}
    after = read_records(run_dir / "samples" / "eval_after.jsonl")
    if before and after:
        lines += ["Held-out answers before → after PPO (first 3):", ""]
        for r in after[:3]:
            lines += [f"- prompt: {_short(r['prompt'], 160)}", f"  - before: {_short(before.get(r['uid'], {}).get('response', ''), 240)}",
                      f"  - after: {_short(r.get('response', ''), 240)}"]
        lines.append("")
    return lines


def _dpo_section(stages: dict, metrics: list[dict]) -> list[str]:
    info = stages.get("dpo", {})
    if "heldout_accuracy" not in info:
        return []
    lines = ["## RL-CAI by DPO", "",
             f"Held-out implicit-reward accuracy **{info['heldout_accuracy']:.3f}** (before training "
             f"{info.get('heldout_accuracy_before', float('nan')):.3f}; chance 0.5; the reference ties every pair), "
             f"margin r_c − r_r {info.get('heldout_margin', float('nan')):.4f}, on {info.get('heldout_pairs')} held-out "
             f"pairs, trained on {info.get('train_pairs')}."]
    lines += [_by_source(info), ""] if info.get("heldout_accuracy_by_source") else [""]
    rows = [r for r in metrics if r.get("stage") == "dpo"]
    if rows:
        lines += ["| step | loss | accuracy | margin | log π(chosen) | log π(rejected) |", "|---|---|---|---|---|---|"]
        for r in rows:
            cols = [r.get(f"dpo/{k}") for k in ("loss", "accuracy", "margin", "chosen_logprob", "rejected_logprob")]
            lines.append(f"| {r['step']} | " + " | ".join("—" if c is None else f"{c:.4g}" for c in cols) + " |")
        lines.append("")
    return lines


def _eval_section(run_dir: Path) -> list[str]:
    from trainer.eval.report import markdown_table
    from trainer.stages.evaluate import POINT_LABELS, load_points

    results = load_points(run_dir)
    if not results:
        return []
    judges = sorted({r.judge.describe() for r in results.values() if r.judge is not None})
    lines = ["## Evaluation: " + " → ".join(POINT_LABELS[p] for p in results), "",
             "Held-out suites (eval: in config.yaml). Values with 95 % bootstrap CIs; Δ = difference vs the base "
             "model on the same items (paired bootstrap CI); a win rate is against the base model's replies, "
             "judged in both orders.", ""]
    if judges:
        lines += [f"Judge: {'; '.join(judges)}.", ""]
    lines += [markdown_table(list(results.values()), [POINT_LABELS[p] for p in results]), ""]
    notes = sorted({n for point, r in results.items() if point != "base" for n in r.notes})
    lines += ["Not measured:", *[f"- {n}" for n in notes], ""] if notes else []
    if (run_dir / "eval" / "eval.png").is_file():
        lines += ["![evaluation](eval/eval.png)", ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    stages = StageRecord(run_dir).read()
    metrics = read_records(run_dir / "metrics.jsonl")
    plot_ppo(run_dir, [r for r in metrics if r.get("stage") == "ppo"])
    lines = [f"# cairl run `{run_dir.name}`", ""]
    lines += _eval_section(run_dir)
    lines += ["## Stages", "", "| stage | done | wall time (s) |", "|---|---|---|"]
    for stage in ("sl", "label", "dpo", "rm", "ppo"):
        if stage in stages:
            lines.append(f"| {stage} | {stages[stage].get('done', False)} | {stages[stage].get('seconds', '—')} |")
    eval_seconds = stages.get("eval", {}).get("seconds", {})
    for point in ("base", "sl", "rl"):
        if point in eval_seconds:
            lines.append(f"| eval {point} | True | {eval_seconds[point]} |")
    lines.append("")
    lines += topology.report_lines(run_dir)
    lines += _sl_section(run_dir)
    lines += _label_section(run_dir, stages)
    lines += _dpo_section(stages, metrics)
    lines += _ppo_section(run_dir, stages, metrics)
    lines += ["## Files", "", "config.yaml, metrics.jsonl, tb/, samples/*.jsonl, checkpoints/<stage>/, hf/ (export)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    (run_dir / "report.json").write_text(json.dumps(stages, indent=2), encoding="utf-8")
    return out
