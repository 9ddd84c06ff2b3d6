"""Our sampler vs transformers `generate` on SmolLM2-135M-Instruct, side by side in one process.

    .venv/bin/python benchmarks/sampler_vs_transformers.py            # batch 1, 8, 32; 128 new tokens
    .venv/bin/python benchmarks/sampler_vs_transformers.py --batches 1,8 --runs 3

Same fp32 weights (the cached HF-layout safetensors, read by both), same chat prompts (left-padded),
greedy, every sequence runs the full --new-tokens (stop tokens disabled on both sides), torch and
XLA on 2 threads. Throughput = generated tokens / median wall time of a whole generate call.

The roofline is memory bandwidth (trainer/bench/sampler.py): a decode step must stream every weight
once plus the filled part of the KV cache, with the bandwidth measured here (numpy reductions over
1 GiB on 1 and 2 threads, best of 5). The goal is ≥ 3× transformers at batch 8 and ≥ 1.5× at
batch 1; docs/performance.md has what was measured. Other processes' load (printed) lowers both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about autumn leaves.",
    "How do I make a cup of green tea?",
    "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
]


def time_transformers(hf, prompts, new_tokens: int, pad_id: int, runs: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    with torch.no_grad():
        hf.generate(ids[:, :], **{**kwargs, "max_new_tokens": 2})  # warm-up
        times, out = [], None
        for _ in range(runs):
            start = time.perf_counter()
            out = hf.generate(ids, **kwargs)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out[:, width:].numpy()


def main(argv=None) -> None:
    from trainer.runtime import set_cpu_xla_flags

    set_cpu_xla_flags()  # the XLA:CPU settings every cairl process uses
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from models.fetch import fetch_embedded
    from models.generation import Sampler
    from models.sampling import SamplingParams
    from models.sources import load
    from trainer.bench.sampler import decode_bytes_per_step, measure, measure_bandwidth_gbs, weight_bytes

    torch.set_num_threads(args.threads)
    hf_dir = fetch_embedded(args.model)
    loaded = load(str(hf_dir), dtype="float32")
    tok, config = loaded.tokenizer, loaded.config
    sampler = Sampler(loaded.model, stop_ids=(), pad_id=tok.pad_id)  # no stop: every row runs the full budget
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # likewise for transformers
    params = SamplingParams(max_new_tokens=args.new_tokens)
    bandwidth = measure_bandwidth_gbs()
    weights = weight_bytes(loaded.model)
    print(f"memory bandwidth {bandwidth:.1f} GB/s; load average {os.getloadavg()[0]:.1f}; threads {args.threads}", flush=True)

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)]
        load_before = os.getloadavg()[0]
        ours = measure(sampler, prompts, params, args.runs)
        ours_tps = ours["tokens_per_s"]
        roofline = batch * bandwidth * 1e9 / decode_bytes_per_step(config, weights, batch, max(map(len, prompts)), args.new_tokens)
        row = {"batch": batch, "new_tokens": args.new_tokens, "ours_tokens_per_s": ours_tps,
               "ours_compile_s": ours["compile_s"], "roofline_tokens_per_s": roofline,
               "roofline_fraction": ours_tps / roofline}
        if not args.skip_transformers:
            hf_s, hf_tokens = time_transformers(hf, prompts, args.new_tokens, tok.pad_id, args.runs)
            hf_tps = batch * args.new_tokens / hf_s
            same = float(np.mean([np.array_equal(a, b) for a, b in zip(ours["tokens"], hf_tokens)]))
            row.update(transformers_tokens_per_s=hf_tps, speedup=ours_tps / hf_tps, identical_rows=same)
        row["load_avg_1m"] = round((load_before + os.getloadavg()[0]) / 2, 2)
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    print(json.dumps({"bandwidth_gbs": bandwidth, "rows": rows}))


if __name__ == "__main__":
    main()
