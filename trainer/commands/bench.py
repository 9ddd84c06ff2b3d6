"""`cairl bench NAME`: performance measurements that print a final JSON line.

Each benchmark lives in `trainer/bench/<name>.py` exposing `add_arguments(parser)` and `run(args) -> dict`.
"""

from __future__ import annotations

import importlib
import json

BENCHMARKS = {
    "sampler": "trainer.bench.sampler",
    "ppo": "trainer.bench.ppo",
    "rl": "trainer.bench.rl",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure sampler / training-step throughput")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(handler=lambda args, module=module: _run(module, args))


def _run(module, args) -> int:
    result = module.run(args)
    print(json.dumps(result, sort_keys=True))
    return 0
