"""Time to load the cached embedded model, and `cairl generate` end to end, on this machine.

    .venv/bin/python benchmarks/load_model.py [--repeats 3] [--transformers]

Measures, each in a fresh process so imports and file reads count as a user sees them:
  * load_s: `models.sources.load("smollm2-135m-instruct")` from the cache (goal <= 5 s), after imports;
  * process_load_s: interpreter start + imports + that load;
  * generate_s: `cairl generate --prompt "How do I bake a chocolate cake?"` (default settings), wall time;
  * transformers_gguf_s (with --transformers): transformers dequantizing the same GGUF, for comparison.
Prints one JSON line with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAKE = "How do I bake a chocolate cake?"

_LOAD = """
import time, json
t0 = time.perf_counter()
from models.sources import load
t1 = time.perf_counter()
loaded = load("smollm2-135m-instruct")
import jax; jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(loaded.model)))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""

_TRANSFORMERS = """
import time, json, torch, transformers
from models.fetch import embedded_gguf_path
path = embedded_gguf_path("smollm2-135m-instruct")
t0 = time.perf_counter()
transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
print(json.dumps({"transformers_gguf_s": time.perf_counter() - t0}))
"""


def _python(code: str) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    from trainer.runtime import set_cpu_xla_flags

    set_cpu_xla_flags()  # the XLA:CPU settings every cairl process uses
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transformers", action="store_true", help="also time transformers loading the GGUF")
    args = parser.parse_args()

    subprocess.run([sys.executable, "-m", "trainer.cli", "fetch-model", "smollm2-135m-instruct"], cwd=ROOT,
                   check=True, capture_output=True)  # the cache is what is being measured, not the download
    loads, processes, generates = [], [], []
    for _ in range(args.repeats):
        result, wall = _python(_LOAD)
        loads.append(result["load_s"])
        processes.append(wall)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "trainer.cli", "generate", "--prompt", CAKE], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        generates.append(time.perf_counter() - start)
        reply = done.stdout.strip()
        print(f"load {loads[-1]:.2f} s (process {wall:.2f} s), generate {generates[-1]:.2f} s", file=sys.stderr)
    out = {
        "load_s": statistics.median(loads),
        "process_load_s": statistics.median(processes),
        "generate_s": statistics.median(generates),
        "generate_reply_words": len(reply.split()),
        "cpu_count": os.cpu_count(),
    }
    if args.transformers:
        out.update(_python(_TRANSFORMERS)[0])
    print(reply, file=sys.stderr)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
