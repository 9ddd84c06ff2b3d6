"""`cairl export`: write any model cairl can load as a Hugging Face directory transformers loads as is."""

from __future__ import annotations

import logging
import time

from models.export import EXPORT_DTYPES, export_params
from models.hf_io import parse_size
from models.sources import load_checkpoint

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a model as a Hugging Face directory (safetensors)")
    parser.add_argument("--model", required=True, help="registry name, HF directory, .gguf file or run directory")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically if it holds an export)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES), help="weight dtype on disk")
    parser.add_argument("--max-shard-size", default="2GB", help="split weights into shards of at most this size")
    parser.set_defaults(handler=run)


def run(args) -> int:
    max_shard_bytes = parse_size(args.max_shard_size)  # validate flags before the (slow) load
    start = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    out = export_params(args.out, ckpt.config, ckpt.params, ckpt.tokenizer, dtype=args.dtype,
                        max_shard_bytes=max_shard_bytes)
    log.info("exported %s to %s (%s) in %.1f s", args.model, out, args.dtype, time.perf_counter() - start)
    print(out)
    return 0
