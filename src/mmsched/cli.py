"""The ``mmsched`` command line (``mmsched --help`` prints ``DESCRIPTION``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mmsched.bench.fanout import (
    DEFAULT_SIZES_MB,
    DEFAULT_STRATEGIES,
    DEFAULT_TRANSPORTS,
    INPUTS,
    FanoutRecord,
    combinations,
    requests_in_run,
    run_fanout,
)
from mmsched.bench.load import DISTINCT, WORKLOADS, LoadRecord, run_load
from mmsched.bench.load import INPUTS as LOAD_INPUTS
from mmsched.bench.load import WORKERS as LOAD_WORKERS
from mmsched.bench.report import write_report
from mmsched.config import Config
from mmsched.errors import ConfigError, MmschedError
from mmsched.hashing import DEFAULT_HASHER, hasher_names
from mmsched.stores import store_class, store_names
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


DESCRIPTION = """\
Carry multimodal inputs from the tokenizer to every tensor-parallel rank.

commands:
  mmsched serve          an OpenAI-compatible chat server with images, on the pipeline
  mmsched rank           start this host's ranks of a group spread over several hosts
  mmsched bench fanout   latency until every rank holds a request's inputs
  mmsched bench load     open-loop load against the pipeline, per strategy and transport
  mmsched bench serve    open-loop chat load against any OpenAI-compatible server
  mmsched bench report   a Markdown report with plots from the benchmarks' --json files

Each command's --help lists its flags."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mmsched`` argument parser: ``bench fanout``, ``bench load``, ``bench report``."""
    parser = argparse.ArgumentParser(
        prog="mmsched",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        "--strategy",  # the load benchmark's spelling: either works in both
        type=_csv(str),
        help="comma-separated (default per-rank,entry-broadcast,tokenizer,zero-copy; with "
        "--hosts: zero-copy)",
    )
    fan.add_argument(
        "--transports",
        "--transport",
        type=_csv(str),
        help=f"comma-separated, of {', '.join(transport_names())} (default torch,zmq,shm; "
        "with --hosts: zmq)",
    )
    fan.add_argument(
        "--input",
        type=_csv(str),
        default=list(INPUTS),
        help="comma-separated, of copy (the processor's output in ordinary memory, copied in: "
        "the realistic path), arena (the processor writes into Pipeline.allocate_tensor; "
        "only where the payload store shares its allocations) and gpu (the processor's "
        "output is on the GPU; only with --consume cuda) and repeat (a new tensor with the "
        "same bytes every request; only with --feature-cache-mb) (default: all)",
    )
    fan.add_argument(
        "--consume",
        type=_csv(str),
        default=["none", "read"],
        help="what a rank does before it counts as ready, comma-separated: none (holds usable "
        "tensors), read (reads every byte once), cuda (holds them on its GPU: needs CUDA) "
        "(default none,read)",
    )
    fan.add_argument(
        "--stores",
        type=_csv(str),
        help=f"payload stores to run each strategy with, comma-separated, of "
        f"{', '.join(store_names())} (default: each strategy's own; a preset keeps its own)",
    )
    fan.add_argument(
        "--feature-cache-mb",
        type=int,
        default=0,
        help="each rank's feature cache (Config.feature_cache_mb; default 0: none)",
    )
    fan.add_argument(
        "--hasher",
        default=DEFAULT_HASHER,
        choices=hasher_names(),
        help=f"content hash for every strategy (default {DEFAULT_HASHER}, as Config)",
    )
    fan.add_argument(
        "--requests", type=int, default=20, help="timed requests per size (default 20)"
    )
    fan.add_argument("--warmup", type=int, default=3, help="untimed requests per size (default 3)")
    fan.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="spread the ranks over this many hosts, simulated here with network namespaces "
        "(needs root; --tp ranks in all; one strategy and transport; default 1)",
    )
    fan.add_argument("--json", type=Path, help="write one record per row to this file")

    load = bench.add_parser(
        "load", help="throughput and tail latency under open-loop Poisson arrivals"
    )
    load.add_argument("--tp", type=int, default=4, help="scheduler ranks (default 4)")
    load.add_argument("--rate", type=float, default=100.0, help="offered requests/s (default 100)")
    load.add_argument("--rates", type=_csv(float), help="a sweep of offered rates, comma-separated")
    load.add_argument("--requests", type=int, default=1000, help="requests per rate (default 1000)")
    load.add_argument(
        "--workload", choices=list(WORKLOADS), default="image", help="(default image)"
    )
    load.add_argument(
        "--strategies",
        "--strategy",
        dest="strategy",
        type=_csv(str),
        default=list(DEFAULT_STRATEGIES),
        help=f"comma-separated (default {','.join(DEFAULT_STRATEGIES)})",
    )
    load.add_argument(
        "--transports",
        "--transport",
        dest="transport",
        type=_csv(str),
        default=["torch"],
        help="comma-separated (default torch)",
    )
    load.add_argument(
        "--hasher",
        default=DEFAULT_HASHER,
        choices=hasher_names(),
        help=f"(default {DEFAULT_HASHER}, as Config)",
    )
    load.add_argument(
        "--model-step-ms", type=float, default=5.0, help="stub model step (default 5 ms)"
    )
    load.add_argument(
        "--input",
        choices=list(LOAD_INPUTS),
        default="copy",
        help="copy: pixels in ordinary memory, copied in by the pipeline (default, the "
        "realistic path); arena: each request's processor writes them into a fresh "
        "Pipeline.allocate_tensor, in the tokenizer's process; worker: one of --workers "
        "processor worker processes writes them into the arena (Pipeline.producer_access)",
    )
    load.add_argument(
        "--feature-cache-mb",
        type=int,
        default=0,
        help="each rank's feature cache (Config.feature_cache_mb; default 0: none)",
    )
    load.add_argument(
        "--workers",
        type=int,
        default=LOAD_WORKERS,
        help=f"processor worker processes under --input worker (default {LOAD_WORKERS})",
    )
    load.add_argument(
        "--distinct",
        type=int,
        default=DISTINCT,
        help=f"distinct samples per kind that requests draw from (default {DISTINCT})",
    )
    load.add_argument("--json", type=Path, help="write one record per row to this file")

    serve_bench = bench.add_parser(
        "serve",
        help="open-loop chat load with images against any OpenAI-compatible server",
        description="Streamed chat requests with images, arriving at a fixed mean rate "
        "(Poisson), against any OpenAI-compatible endpoint: mmsched serve, SGLang, vLLM. "
        "Every request carries images of its own; TTFT and end-to-end percentiles.",
    )
    serve_bench.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="the API's base URL"
    )
    serve_bench.add_argument("--model", help="model id (default: the first the server lists)")
    serve_bench.add_argument(
        "--rates", type=_csv(float), default=[2.0], help="requests/s, comma-separated"
    )
    serve_bench.add_argument(
        "--images", type=_csv(int), default=[1], help="images per request, comma-separated"
    )
    serve_bench.add_argument(
        "--requests", type=int, default=100, help="timed requests per point (default 100)"
    )
    serve_bench.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT")
    serve_bench.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    serve_bench.add_argument("--max-tokens", type=int, default=32, help="per request")
    serve_bench.add_argument(
        "--clients",
        type=int,
        default=1,
        help="client processes sending the load, each its share of the arrivals (default 1)",
    )
    serve_bench.add_argument(
        "--repeat",
        type=float,
        default=0.0,
        help="share of requests (0-1) that resend an earlier request's images (default 0)",
    )
    serve_bench.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws the images and arrivals (default 0); the same seed sends the same "
        "images again, which a server's cache then answers: change it between runs against "
        "one live server",
    )
    serve_bench.add_argument("--json", type=Path, help="write one record per point")

    report = bench.add_parser("report", help="a Markdown report with plots from --json files")
    report.add_argument("inputs", type=Path, nargs="+", help="JSON files from fanout or load")
    report.add_argument("--out", type=Path, default=Path("bench-results/report"))

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible chat server (POST /v1/chat/completions) on the pipeline",
        description="An OpenAI-compatible chat server: images in data: URLs are processed by "
        "Qwen2-VL's image processor and carried to every rank by the pipeline. The pipeline "
        "is configured by --config, then MMSCHED_* variables, then the flags that name a "
        "config field (--tp, --max-prompt-tokens, --shutdown-timeout, --wire-pixels, "
        "--nnodes, --dist-init-addr, --preprocess*, --api-servers).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--config", type=Path, help="a TOML config file")
    serve.add_argument("--tp", type=int, help="scheduler ranks (Config.tp_size)")
    serve.add_argument(
        "--model",
        default=None,
        help="the model the ranks run and the id answered to: mmsched-stub-qwen2-vl (the "
        "default: the stub, whose reply says what reached the ranks), tiny-qwen2-vl "
        "(transformers' Qwen2-VL, tiny and random: its generated text); any other id serves "
        "the stub under that name",
    )
    serve.add_argument("--max-images", type=int, default=16, help="images per request")
    serve.add_argument("--max-image-mb", type=int, default=20, help="largest encoded image")
    serve.add_argument(
        "--max-prompt-tokens", type=int, help="longest prompt in tokens (max_prompt_tokens)"
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        help="seconds requests in progress get once told to stop (shutdown_timeout_s)",
    )
    serve.add_argument(
        "--wire-pixels",
        choices=["float32", "uint8"],
        help="what travels to the ranks for each image: the processor's resized uint8 "
        "pixels, normalized and patchified on each rank (the default), or its float32 "
        "pixel_values (wire_pixels)",
    )
    serve.add_argument(
        "--preprocess",
        choices=["auto", "cpu", "threads", "cuda"],
        help="where images are decoded and processed (preprocess_backend; default auto: "
        "cpu worker processes where torchvision imports, else Pillow on threads)",
    )
    serve.add_argument(
        "--preprocess-workers", type=int, help="the cpu pool's processes (preprocess_workers)"
    )
    serve.add_argument(
        "--preprocess-device", help="the cuda backend's GPU (preprocess_device; default cuda:0)"
    )
    serve.add_argument(
        "--api-servers",
        type=int,
        help="HTTP processes sharing the port, each parsing and checking requests, feeding "
        "one engine process (api_servers; default 1: one process does everything)",
    )
    serve.add_argument(
        "--preprocess-cache-mb",
        type=int,
        help="processed-features cache by content key (preprocess_cache_mb; default 1024, 0: none)",
    )
    _host_flags(serve, required=False)

    rank = sub.add_parser(
        "rank",
        help="start this host's ranks of a group spread over several hosts (node 1 and up)",
        description="Join node 0 (the process running the pipeline: mmsched serve, or a "
        "server's Pipeline) and run this host's tp_size/nnodes ranks until the group ends. "
        "The config (--config, MMSCHED_* variables, the flags) must match node 0's.",
    )
    _host_flags(rank, required=True)
    rank.add_argument("--node-rank", type=int, required=True, help="this host: 1 .. nnodes-1")
    rank.add_argument("--config", type=Path, help="a TOML config file")
    rank.add_argument("--tp", type=int, help="scheduler ranks of the whole group (tp_size)")
    rank.add_argument(
        "--on-iteration", help="the ranks' model step, as module:function (default: the stub)"
    )
    rank.add_argument("--on-rank-start", help="per-rank set-up, as module:function")
    rank.add_argument(
        "--rendezvous",
        type=Path,
        help="start no ranks: feed the server's own, which join a RankGroup in this "
        "directory of this host (node 0 is a RankGroup too)",
    )
    return parser


def _host_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--nnodes", type=int, required=required, help="hosts the ranks are spread over"
    )
    parser.add_argument(
        "--dist-init-addr", required=required, help="node 0's HOST:PORT, where hosts join"
    )


def _config(args: argparse.Namespace) -> Config:
    """The config of ``serve`` and ``rank``: the file, the environment, then the flags."""
    config = (Config.from_toml(args.config) if args.config else Config()).with_env()
    flags = {
        "tp_size": args.tp,
        "nnodes": args.nnodes,
        "dist_init_addr": args.dist_init_addr,
        # mmsched serve's own (mmsched rank has no such flags)
        "max_prompt_tokens": getattr(args, "max_prompt_tokens", None),
        "shutdown_timeout_s": getattr(args, "shutdown_timeout", None),
        "wire_pixels": getattr(args, "wire_pixels", None),
        "preprocess_backend": getattr(args, "preprocess", None),
        "preprocess_workers": getattr(args, "preprocess_workers", None),
        "preprocess_device": getattr(args, "preprocess_device", None),
        "preprocess_cache_mb": getattr(args, "preprocess_cache_mb", None),
        "api_servers": getattr(args, "api_servers", None),
    }
    return config.replace(**{k: v for k, v in flags.items() if v is not None})


def _import_callback(spec: str | None) -> Any:
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import {spec!r} (module:function): {exc}") from exc


def _rank(args: argparse.Namespace, console: Console) -> int:
    from mmsched.node import run_node

    config = _config(args)
    first = args.node_rank * config.ranks_per_node
    last = first + config.ranks_per_node - 1
    own = f" (the server's own, meeting in {args.rendezvous})" if args.rendezvous else ""
    console.print(
        f"node {args.node_rank} of {config.nnodes}: ranks {first}..{last} of {config.tp_size}"
        f"{own}, joining {config.dist_init_addr}"
    )
    try:
        run_node(
            config,
            args.node_rank,
            on_iteration=_import_callback(args.on_iteration),
            on_rank_start=_import_callback(args.on_rank_start),
            rendezvous=args.rendezvous,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print(f"node {args.node_rank}: stopped by a signal; node 0 was told")
        return 130
    console.print(f"node {args.node_rank}: the group ended")
    return 0


def _fanout_table(records: list[FanoutRecord], title: str) -> Table:
    table = _new_table(
        title,
        (
            "strategy",
            "transport",
            "store",
            "input",
            "consume",
            "TP",
            "MB",
            "p50 ms",
            "p99 ms",
            "floor ms",
            "x floor",
            "CPU ms/req",
            "hashes/req",
            "encoded MB",
            "sent KB",
            "identical",
        ),
    )
    for r in records:
        table.add_row(
            r.strategy,
            r.transport,
            r.payload_store,
            r.input,
            r.consume,
            str(r.tp),
            f"{r.size_mb:g}",
            f"{r.latency_ms['p50']:.2f}",
            f"{r.latency_ms['p99']:.2f}",
            f"{r.floor_ms:.2f}",
            f"{r.x_floor:.2f}",
            f"{r.cpu_ms_per_request:.1f}",
            f"{r.hashes_per_request:g}",
            f"{r.encoded_bytes / 1e6:.2f}",
            f"{r.sent_bytes / 1e3:.1f}",
            "yes" if r.ranks_identical else "NO",
        )
    return table


FANOUT_LEGEND = """\
store      the payload store: where tensor bytes wait for the ranks
input      copy: each request's pixels are a new tensor in ordinary memory (a processor's output);
           arena: the processor wrote them into a fresh Pipeline.allocate_tensor (shared memory);
           gpu: they are a new tensor on the GPU (a GPU processor's output);
           repeat: a new tensor with the same bytes every request (the ranks cache it)
consume    none: the last rank holds usable tensors; read: it has also read every byte once;
           cuda: it holds them on its GPU, copied
p50, p99   from the call into the pipeline to the last rank done (fresh bytes every request)
floor      median over the row's requests of the least work its path needs, measured right
           after each request on a payload made the same way: copy path min(copy + hash, copy
           and hash at once), arena path one hash, plus one read pass under read, plus one
           page-locked copy to the GPU under cuda; gpu path one hash plus one GPU-to-GPU copy;
           repeat path one hash
x floor    p50 / floor: 1.0 is this machine's limit; below 1 is a measurement bug
CPU ms/req user + system CPU of the tokenizer and every rank, per request
hashes/req content hashes computed per request, all processes (1 = hashed once)
encoded MB bytes of the request as sent by the tokenizer, tensors inline (a reference under
           the shm store is a few hundred bytes)
sent KB    median bytes a timed request actually sent to rank 0 (token ids included)
identical  every rank held the same inputs as the tokenizer (fingerprints, and all bytes of
           the warm-up and last requests)"""


def _check_names(
    strategies: list[str], transports: list[str], stores: list[str] | None = None
) -> None:
    """Fail before any pipeline starts if a name is unknown (the error lists known ones)."""
    for name in strategies:
        get_strategy(name)
    for name in transports:
        transport_class(name)
    for name in stores or []:
        store_class(name)


def _new_table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        # Numbers never wrap; headers and names may, so that the table fits the terminal.
        text = col in ("strategy", "transport", "input", "consume", "busiest process")
        table.add_column(col, justify="left" if text else "right", no_wrap=not text)
    return table


def _bench_fanout(args: argparse.Namespace, console: Console) -> int:
    several_hosts = args.hosts > 1
    if args.strategies is None:
        args.strategies = ["zero-copy"] if several_hosts else list(DEFAULT_STRATEGIES)
    if args.transports is None:
        args.transports = ["zmq"] if several_hosts else list(DEFAULT_TRANSPORTS)
    _check_names(args.strategies, args.transports, args.stores)
    if several_hosts:
        return _bench_fanout_hosts(args, console)
    records: list[FanoutRecord] = []
    # What the run covers: the progress bar counts it, the run does it.
    matrix: dict[str, Any] = {
        "strategies": args.strategies,
        "transports": args.transports,
        "sizes_mb": args.sizes,
        "tps": args.tp,
        "requests": args.requests,
        "inputs": args.input,
        "consume": args.consume,
        "stores": args.stores or [None],
        "feature_cache_mb": args.feature_cache_mb,
    }
    total = requests_in_run(**matrix)
    with _progress(console) as progress:
        task = progress.add_task(f"fan-out, {total} timed requests", total=total)

        def record(r: FanoutRecord) -> None:
            records.append(r)
            progress.console.log(
                f"TP={r.tp} {r.strategy}/{r.transport}/{r.payload_store} {r.input} {r.consume} "
                f"{r.size_mb:g} MB: "
                f"p50 {r.latency_ms['p50']:.2f} ms, floor {r.floor_ms:.2f} ms"
            )

        asyncio.run(
            run_fanout(
                **matrix,
                hasher=args.hasher,
                warmup=args.warmup,
                on_request=lambda: progress.advance(task),
                on_record=record,
            )
        )
    tps = ",".join(str(t) for t in args.tp)
    title = f"fan-out latency, TP={tps}, hasher={args.hasher}, {args.requests} requests per row"
    console.print(_fanout_table(records, title))
    console.print(FANOUT_LEGEND, highlight=False, markup=False)
    _write_json(args.json, [r.as_dict() for r in records], console)
    return 0 if all(r.ranks_identical for r in records) else 1


def _bench_fanout_hosts(args: argparse.Namespace, console: Console) -> int:
    from mmsched.bench.hosts import hosts_config, run_hosts_fanout

    if len(args.strategies) * len(args.transports) * len(args.stores or [None]) * len(args.tp) > 1:
        raise ConfigError("--hosts runs one design: one strategy, transport, store and --tp")
    strategy, transport = args.strategies[0], args.transports[0]
    stores = {"payload_store": args.stores[0]} if args.stores else {}
    config = hosts_config(
        args.hosts, args.tp[0], strategy, transport, hasher=args.hasher, **stores
    ).with_env()
    table = _new_table(
        f"fan-out over {args.hosts} simulated hosts, TP={config.tp_size} "
        f"({config.ranks_per_node} per host), {config.strategy}/{config.transport}/"
        f"{config.payload_store}, hasher={config.hasher}, consume=none, "
        f"{args.requests} requests per row",
        ["MB", "p50 ms", "p90 ms", "node 0 p50", "floor ms", "x floor", "link x payload",
         "NIC bytes/req", "identical", "clean"],
    )  # fmt: skip
    records = run_hosts_fanout(
        config,
        args.sizes,
        requests=args.requests,
        warmup=args.warmup,
        work_dir=Path("bench-results") / "hosts-logs",  # each host's output
    )
    for r in records:
        table.add_row(
            f"{r.size_mb:g}",
            f"{r.latency_ms['p50']:.2f}",
            f"{r.latency_ms['p90']:.2f}",
            f"{r.node0_latency_ms['p50']:.2f}",
            f"{r.floor_ms:.2f}",
            f"{r.x_floor:.2f}",
            f"{r.link_x_payload:.4f}",
            f"{r.nic_bytes_per_request / 1e6:.2f} MB",
            "yes" if r.identical else "NO",
            "yes" if r.clean else "NO",
        )
    console.print(table)
    console.print(HOSTS_LEGEND, highlight=False, markup=False)
    _write_json(args.json, [r.as_dict() for r in records], console)
    return 0 if all(r.identical and r.clean for r in records) else 1


HOSTS_LEGEND = """\
p50/p90: from the call into the pipeline to the last rank of every host holding the inputs.
node 0 p50: to the last of node 0's own ranks. floor: the same number of fresh bytes sent once
over plain TCP from host 0 to host 1 and acknowledged. link x payload: bytes the busiest
link's agent received over the cross-host transport per request, over the payload (1.0: once).
NIC bytes/req: what left host 0's interface per request and other host (framing, heartbeats
and idle iterations included). clean: no process and no /dev/shm entry left on any host."""


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _load_table(records: list[LoadRecord], title: str) -> Table:
    table = _new_table(
        title,
        (
            "strategy",
            "transport",
            "offered/s",
            "arrived/s",
            "achieved/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "CPU s/req",
            "CPU % tok/r0/r1..",
            "errors",
            "cache hit %",
            "MB sent/req",
            "keeps up",
        ),
    )
    for r in records:
        table.add_row(
            r.strategy,
            r.transport,
            f"{r.offered_rps:g}",
            f"{r.arrival_rps:.1f}",
            f"{r.achieved_rps:.1f}",
            f"{r.latency_ms['p50']:.1f}",
            f"{r.latency_ms['p90']:.1f}",
            f"{r.latency_ms['p99']:.1f}",
            f"{r.cpu_seconds_per_request:.4f}",
            "/".join(f"{u * 100:.0f}" for u in r.cpu_utilization.values()),
            str(r.errors),
            f"{r.cache['hit_rate'] * 100:.1f}" if r.cache else "-",
            f"{r.cache['feature_mb_sent_per_request']:.2f}" if r.cache else "-",
            "yes" if r.keeps_up else "NO",
        )
    return table


LOAD_LEGEND = """\
arrived/s  the rate the random (Poisson) schedule realised; keeps up: achieved >= 98% of it
p50..p99   from each request's scheduled arrival to its answer, client side (queueing counts)
CPU s/req  user + system CPU of the tokenizer process, every rank (and the processor
           workers, under input worker), per request
CPU %      each process's CPU over the run (100 = one core): tokenizer, then rank 0, 1, ...,
           then the processor workers together (input worker)
cache hit% features of the rate's requests found in the ranks' feature cache
MB sent/req feature bytes that travelled to the ranks, per request (with a cache)"""

SERVE_LEGEND = """\
arrived/s  the rate the random (Poisson) schedule realised
sent/s     the rate the client processes actually sent at; lag: a request's start after it
           was due; client CPU/req: the client processes' CPU time per request (rate x it /
           clients: the share of a core each needs); clients ok: p99 lag <= 5 ms and
           sent/s >= 95% of arrived/s (if not, the load generator, not the server, limited
           the run: add --clients, as many as there are cores to run them)
TTFT, e2e  from each request's scheduled arrival, client side (queueing counts)
keeps up   the server: no request failed, done/s >= 95% of arrived/s
read       server: body read and parsed; key: images read from their URLs and keyed;
           process: cache or decoding and processor (fresh images; repeats apart);
           prepare: arrival to inputs ready; pipeline: hash, placement, ranks, answer;
           server: prepare + pipeline (fresh images; repeats apart)
processed  images the server's preprocessing stage decoded and processed over the point
           (warm-up included: each client's untimed first requests, all fresh), and those
           its cache answered"""


def _bench_load(args: argparse.Namespace, console: Console) -> int:
    _check_names(args.strategy, args.transport)
    rates = args.rates or [args.rate]
    records: list[LoadRecord] = []
    with _progress(console) as progress:
        task = progress.add_task("starting", total=None)

        def start(label: str, total: int) -> None:
            progress.reset(task, description=label, total=total)

        def done() -> None:
            progress.advance(task)

        def record(r: LoadRecord) -> None:
            records.append(r)
            console.log(
                f"{r.strategy}/{r.transport} @ {r.offered_rps:g}/s: {r.achieved_rps:.1f}/s, "
                f"p99 {r.latency_ms['p99']:.1f} ms"
            )

        asyncio.run(
            run_load(
                pairs=combinations(args.strategy, args.transport),
                rates=rates,
                workload=args.workload,
                tp=args.tp,
                requests=args.requests,
                hasher=args.hasher,
                model_step_ms=args.model_step_ms,
                input_path=args.input,
                distinct=args.distinct,
                workers=args.workers,
                feature_cache_mb=args.feature_cache_mb,
                on_start=start,
                on_done=done,
                on_record=record,
            )
        )
    title = (
        f"load: {args.workload} ({args.distinct} distinct), input={args.input}, TP={args.tp}, "
        f"hasher={args.hasher}, model step {args.model_step_ms:g} ms, feature cache "
        f"{args.feature_cache_mb} MB"
    )
    if records and records[0].repeat_share:
        title += f", {records[0].repeat_share * 100:.0f}% of requests resend earlier media"
    console.print(_load_table(records, title))
    console.print(LOAD_LEGEND, highlight=False, markup=False)
    _write_json(args.json, [r.as_dict() for r in records], console)
    return 0


def _bench_serve(args: argparse.Namespace, console: Console) -> int:
    from mmsched.bench.serve import ServeRecord, run_serve

    repeat = f", {args.repeat * 100:.0f}% resending earlier images" if args.repeat else ""
    table = _new_table(
        f"bench serve: {args.base_url}, {args.image_size} {args.image_format}, "
        f"{args.requests} requests per point{repeat}",
        ["images", "MB/req", "offered/s", "arrived/s", "done/s", "failed", "TTFT p50",
         "TTFT p99", "e2e p50", "e2e p90", "e2e p99", "keeps up"],
    )  # fmt: skip
    clients = _new_table(
        f"the load generator: {args.clients} client process(es)",
        ["images", "offered/s", "arrived/s", "sent/s", "lag p50", "lag p99", "lag max",
         "client CPU/req", "clients ok"],
    )  # fmt: skip
    split = _new_table(
        "where the server's time went (x-mmsched-timing, p50)",
        ["images", "offered/s", "read", "key", "process", "process (repeats)", "prepare",
         "pipeline", "server", "server (repeats)", "processed / from cache"],
    )  # fmt: skip

    def ms(m: dict[str, float]) -> str:
        value = m.get("p50", 0.0)  # a cache's answer takes hundredths of a ms
        return "-" if not value else f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"

    def images_done(r: ServeRecord) -> str:
        if not r.server_images:
            return "-"
        cached = r.server_images.get("cached", 0) + r.server_images.get("joined", 0)
        return f"{r.server_images.get('processed', 0)} / {cached}"

    def row(r: ServeRecord) -> None:
        point = (str(r.images_per_request), f"{r.offered_rps:g}")
        table.add_row(
            point[0],
            f"{r.mb_per_request:.2f}",
            point[1],
            f"{r.arrived_rps:.2f}",
            f"{r.achieved_rps:.2f}",
            str(r.failed),
            *(f"{v:.0f} ms" for v in (r.ttft_ms["p50"], r.ttft_ms["p99"])),
            *(f"{r.e2e_ms[q]:.0f} ms" for q in ("p50", "p90", "p99")),
            "yes" if r.keeps_up else "no",
        )
        clients.add_row(
            *point,
            f"{r.arrived_rps:.2f}",
            f"{r.sent_rps:.2f}",
            *(f"{r.client_lag_ms[q]:.1f} ms" for q in ("p50", "p99", "max")),
            f"{r.client_cpu_ms_per_request:.2f} ms",
            "yes" if r.client_keeps_up else "no",
        )
        split.add_row(
            *point,
            *map(
                ms,
                (r.server_read_ms, r.server_key_ms, r.server_process_ms,
                 r.server_process_repeat_ms, r.server_prepare_ms, r.server_pipeline_ms,
                 r.server_ms, r.server_repeat_ms),
            ),
            images_done(r),
        )  # fmt: skip
        console.print(f"done: {r.images_per_request} image(s) at {r.offered_rps:g}/s")

    records = asyncio.run(
        run_serve(
            args.base_url,
            model=args.model,
            rates=args.rates,
            images_per_request=args.images,
            requests=args.requests,
            image_size=args.image_size,
            image_format=args.image_format,
            max_tokens=args.max_tokens,
            clients=args.clients,
            repeat=args.repeat,
            seed=args.seed,
            on_record=row,
        )
    )
    console.print(table)
    console.print(clients)
    if any(r.server_prepare_ms["p50"] for r in records):
        console.print(split)
    console.print(SERVE_LEGEND, highlight=False, markup=False)
    for r in records:
        if r.first_error:
            console.print(f"first error at {r.offered_rps:g}/s: {r.first_error}")
    _write_json(args.json, [r.as_dict() for r in records], console)
    return 0 if all(r.failed == 0 for r in records) else 1


def _serve(args: argparse.Namespace, console: Console) -> int:
    try:
        from mmsched.models import served_model
        from mmsched.serve import DEFAULT_MODEL, ServeSettings, create_app, run
    except ImportError as exc:
        hint = f"{exc}: install the serve extra: pip install 'mmsched[serve]'"
        console.print(f"[red]error:[/red] {escape(hint)}")
        return 2
    config = _config(args)
    settings = ServeSettings(
        model=args.model or DEFAULT_MODEL,
        max_images=args.max_images,
        max_image_mb=args.max_image_mb,
    )
    console.print(
        f"serving {settings.model} on http://{args.host}:{args.port}: TP={config.tp_size}, "
        f"{config.strategy} over {config.transport}, {config.payload_store} store"
    )
    served = served_model(settings.model)
    if config.api_servers > 1:
        from mmsched.serve.apiservers import serve_api_servers

        # Warnings and errors on stderr, as each HTTP process writes its own: one that
        # dies, and its replacement, are worth an operator's eye.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

        return serve_api_servers(
            config,
            settings,
            host=args.host,
            port=args.port,
            on_iteration=served.on_iteration,
            on_rank_start=served.on_rank_start,
            generates_text=served.generates_text,
        )
    app = create_app(
        config,
        settings,
        on_iteration=served.on_iteration,
        on_rank_start=served.on_rank_start,
        generates_text=served.generates_text,
    )
    # Not uvicorn.run: its stop waits for every request in progress, however long.
    run(app, host=args.host, port=args.port)
    return 0


def _write_json(path: Path | None, rows: list[dict[str, Any]], console: Console) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    console.print(f"wrote {len(rows)} records to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    # A terminal's own width (rich fits the tables to it); a file or CI log gets a wide one.
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        if args.command == "bench" and args.bench == "fanout":
            return _bench_fanout(args, console)
        if args.command == "bench" and args.bench == "load":
            return _bench_load(args, console)
        if args.command == "bench" and args.bench == "serve":
            return _bench_serve(args, console)
        if args.command == "bench" and args.bench == "report":
            console.print(f"wrote {write_report(args.inputs, args.out)}")
            return 0
        if args.command == "serve":
            return _serve(args, console)
        if args.command == "rank":
            return _rank(args, console)
    except MmschedError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")  # messages hold [0]-style names
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
