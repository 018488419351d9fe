"""The ``mmsched`` command line: ``mmsched bench fanout [...]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmsched.bench.fanout import DEFAULT_SIZES_MB, DEFAULT_STRATEGIES, FanoutRecord, run_fanout
from mmsched.errors import MmschedError
from mmsched.hashing import HASHERS
from mmsched.strategies import get_strategy
from mmsched.transports import transport_names


def _csv(kind: type[float] | type[str]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of {kind.__name__}: {text}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsched", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark").add_subparsers(
        dest="bench", required=True
    )

    fan = bench.add_parser(
        "fanout",
        help="latency until every rank holds a request's inputs, per strategy and size",
    )
    fan.add_argument("--tp", type=int, default=4, help="scheduler ranks (default 4)")
    fan.add_argument(
        "--sizes",
        type=_csv(float),
        default=list(DEFAULT_SIZES_MB),
        help="payload sizes in MB, comma-separated (default 1,10,50,100)",
    )
    fan.add_argument(
        "--strategies",
        type=_csv(str),
        default=list(DEFAULT_STRATEGIES),
        help="comma-separated (default per-rank,entry-broadcast,tokenizer)",
    )
    fan.add_argument("--transport", default="torch", help=f"one of {', '.join(transport_names())}")
    fan.add_argument(
        "--hasher",
        default="sha256",
        choices=sorted(HASHERS),
        help="content hash for every strategy (default sha256, as SGLang)",
    )
    fan.add_argument(
        "--requests", type=int, default=20, help="timed requests per size (default 20)"
    )
    fan.add_argument("--warmup", type=int, default=1, help="untimed requests per size (default 1)")
    fan.add_argument("--json", type=Path, help="write one record per row to this file")
    return parser


def _fanout_table(records: list[FanoutRecord], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "strategy",
        "transport",
        "tp",
        "MB",
        "p50 ms",
        "p99 ms",
        "CPU ms/req",
        "hash ms/req",
        "hashes/req",
        "encoded MB",
        "identical",
    ):
        table.add_column(col, justify="left" if col in ("strategy", "transport") else "right")
    for r in records:
        table.add_row(
            r.strategy,
            r.transport,
            str(r.tp),
            f"{r.size_mb:g}",
            f"{r.latency_ms['p50']:.2f}",
            f"{r.latency_ms['p99']:.2f}",
            f"{r.cpu_ms_per_request:.1f}",
            f"{r.hash_ms_per_request:.1f}",
            f"{r.hashes_per_request:g}",
            f"{r.encoded_bytes / 1e6:.2f}",
            "yes" if r.ranks_identical else "NO",
        )
    return table


def _bench_fanout(args: argparse.Namespace, console: Console) -> int:
    for name in args.strategies:
        get_strategy(name)
    records: list[FanoutRecord] = []

    def progress(record: FanoutRecord) -> None:
        records.append(record)
        console.log(
            f"{record.strategy} {record.size_mb:g} MB: p50 {record.latency_ms['p50']:.2f} ms, "
            f"{record.hashes_per_request:g} hashes/request"
        )

    asyncio.run(
        run_fanout(
            strategies=args.strategies,
            sizes_mb=args.sizes,
            tp=args.tp,
            transport=args.transport,
            hasher=args.hasher,
            requests=args.requests,
            warmup=args.warmup,
            on_record=progress,
        )
    )
    console.print(_fanout_table(records, f"fan-out latency, TP={args.tp}, hasher={args.hasher}"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.as_dict() for r in records], indent=2))
        console.print(f"wrote {len(records)} records to {args.json}")
    return 0 if all(r.ranks_identical for r in records) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Wide enough for the whole table when output goes to a file or CI log.
    console = Console(width=max(150, Console().width))
    try:
        if args.command == "bench" and args.bench == "fanout":
            return _bench_fanout(args, console)
    except MmschedError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
