"""`cairl generate`: one reply from a model; only the reply text goes to stdout (logs go to stderr)."""

from __future__ import annotations

import logging
import time

from models.generation import Sampler, SamplingParams
from models.sources import load

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate a reply to a prompt")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="registry name, HF directory, .gguf file or run directory (default: %(default)s)")
    parser.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="continue the raw prompt instead of a chat turn")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the model's, float32)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p)  # validates before the load
    start = time.perf_counter()
    loaded = load(args.model, dtype=args.dtype)
    tok = loaded.tokenizer
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    if args.no_chat:
        prompt = tok.encode(args.prompt, add_bos=tok.add_bos_token)
    else:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    samples = Sampler(loaded.model, tok.stop_ids, tok.pad_id).generate([prompt], params, seed=args.seed)
    reply = samples.tokens[0, : samples.lengths[0]].tolist()
    log.info("generated %d tokens in %.1f s (compile included)", len(reply), time.perf_counter() - start)
    print(tok.decode(reply).strip())
    return 0
