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

from mmsched.bench.fanout import (
    DEFAULT_SIZES_MB,
    DEFAULT_STRATEGIES,
    DEFAULT_TRANSPORTS,
    FanoutRecord,
    run_fanout,
)
from mmsched.errors import MmschedError
from mmsched.hashing import HASHERS
from mmsched.strategies import get_strategy
from mmsched.transports import transport_class, transport_names


def _csv(kind: type[float] | type[str] | type[int]) -> Callable[[str], list[Any]]:
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
    fan.add_argument(
        "--tp", type=_csv(int), default=[4], help="scheduler ranks, comma-separated (default 4)"
    )
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
        help="comma-separated (default per-rank,entry-broadcast,tokenizer,zero-copy)",
    )
    fan.add_argument(
        "--transports",
        type=_csv(str),
        default=list(DEFAULT_TRANSPORTS),
        help=f"comma-separated, of {', '.join(transport_names())} (default torch,zmq,shm); "
        "zero-copy runs on shm only",
    )
    fan.add_argument(
        "--zero-copy-input",
        choices=["arena", "copy"],
        default="arena",
        help="zero-copy: the processor writes into the arena (default), or the tokenizer copies",
    )
    fan.add_argument(
        "--hasher",
        default="sha256",
        choices=sorted(HASHERS),
        help="content hash for every strategy (default sha256, as SGLang)",
    )
    fan.add_argument(
        "--requests", type=int, default=20, help="timed requests per size (default 20)"
    )
    fan.add_argument("--warmup", type=int, default=3, help="untimed requests per size (default 3)")
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
        "floor ms",
        "x floor",
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
            f"{r.floor_ms:.2f}",
            f"{r.latency_ms['p50'] / r.floor_ms:.1f}" if r.floor_ms else "-",
            "yes" if r.ranks_identical else "NO",
        )
    return table


def _bench_fanout(args: argparse.Namespace, console: Console) -> int:
    for name in args.strategies:
        get_strategy(name)
    for name in args.transports:
        transport_class(name)
    records: list[FanoutRecord] = []

    def floor(size_mb: float, ms: float) -> None:
        console.log(f"floor {size_mb:g} MB: one copy + one {args.hasher} hash = {ms:.2f} ms")

    def progress(record: FanoutRecord) -> None:
        records.append(record)
        console.log(
            f"TP={record.tp} {record.strategy}/{record.transport} {record.size_mb:g} MB: "
            f"p50 {record.latency_ms['p50']:.2f} ms, {record.hashes_per_request:g} hashes/request"
        )

    asyncio.run(
        run_fanout(
            strategies=args.strategies,
            transports=args.transports,
            sizes_mb=args.sizes,
            tps=args.tp,
            hasher=args.hasher,
            requests=args.requests,
            warmup=args.warmup,
            zero_copy_input=args.zero_copy_input,
            on_floor=floor,
            on_record=progress,
        )
    )
    tps = ",".join(str(t) for t in args.tp)
    console.print(_fanout_table(records, f"fan-out latency, TP={tps}, hasher={args.hasher}"))
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
