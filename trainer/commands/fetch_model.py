"""`cairl fetch-model NAME`: download and convert an embedded model into the cache; prints its directory."""

from __future__ import annotations

from models import fetch


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fetch-model", help="download and convert an embedded model into the cache ($CAIRL_CACHE)"
    )
    parser.add_argument("name", help=f"model name: {', '.join(sorted(fetch.EMBEDDED))}")
    parser.set_defaults(handler=run)


def run(args) -> int:
    print(fetch.fetch_embedded(args.name))
    return 0
