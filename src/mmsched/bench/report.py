"""``mmsched bench report``: a Markdown report and PNG plots from benchmark JSON files.

Each input file is one run of ``mmsched bench fanout --json``, ``mmsched bench load --json``
or ``mmsched bench serve --json`` (told apart by their fields). For a fan-out run: a table,
and latency against payload size, one line per strategy and transport. For load runs, pooled
per workload (an image request and a video request are not comparable points): a table,
achieved throughput against offered rate, and P99 latency against offered rate. For a
serving run: end-to-end latency against offered rate, per number of images, and a table
with TTFT. For a ``fanout --hosts`` run: latency to every host's ranks and to node 0's, with
the floor, against payload size, and a table with the bytes per link.

Needs matplotlib (``pip install mmsched[report]``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mmsched.errors import ConfigError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the report needs matplotlib: pip install 'mmsched[report]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _design(r: dict[str, Any]) -> str:
    label = f"{r['strategy']}/{r['transport']}"
    return f"{label}, {r['input']}" if "input" in r else label


def _series(records: list[dict[str, Any]], x: str, y: Any) -> dict[str, list[tuple[float, float]]]:
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        lines[_design(r)].append((float(r[x]), float(y(r))))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def _floors(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per input path, the median of the rows' floors at each size (rows measure their own)."""
    by_path: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("floor_ms") and "input" in r:
            by_path[r["input"]][float(r["size_mb"])].append(float(r["floor_ms"]))
    return {
        f"floor, {path}": sorted((size, statistics.median(v)) for size, v in sizes.items())
        for path, sizes in sorted(by_path.items())
    }


def _plot(
    path: Path,
    title: str,
    lines: dict[str, list[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    *,
    logx: bool = False,
    logy: bool = False,
    diagonal: bool = False,
    floors: dict[str, list[tuple[float, float]]] | None = None,
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for label, points in (floors or {}).items():
        style = "--" if label.endswith("copy") else ":"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, color="black", label=label)
    if diagonal:
        top = max(p[0] for points in lines.values() for p in points)
        ax.plot([0, top], [0, top], linestyle=":", color="grey", label="offered")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hosts_section(name: str, records: list[dict[str, Any]], out: Path) -> list[str]:
    """A ``bench fanout --hosts`` run: latency to every host's ranks and to node 0's, and
    the floor, against payload size; bytes per link in the table."""
    first = records[0]
    image = f"{name}_hosts_latency.png"
    by_size = sorted(records, key=lambda r: float(r["size_mb"]))

    def line(value: Any) -> list[tuple[float, float]]:
        return [(float(r["size_mb"]), float(value(r))) for r in by_size]

    _plot(
        out / image,
        f"{name}: {first['hosts']} hosts, TP={first['tp']}, {first['strategy']}/"
        f"{first['transport']}/{first['payload_store']}, {first['hasher']}",
        {
            "every rank of every host": line(lambda r: r["latency_ms"]["p50"]),
            "node 0's own ranks": line(lambda r: r["node0_latency_ms"]["p50"]),
        },
        "payload (MB)",
        "p50 latency (ms)",
        logx=True,
        logy=True,
        floors={"floor, one TCP crossing": line(lambda r: r["floor_ms"])},
    )
    lines = [
        f"![{name}]({image})\n",
        "| MB | p50 ms | p90 ms | node 0 p50 ms | floor ms | x floor | link x payload |"
        " identical | clean |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in by_size:
        lines.append(
            f"| {r['size_mb']:g} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p90']:.2f} | "
            f"{r['node0_latency_ms']['p50']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
            f"{r['link_x_payload']:.4f} | {'yes' if r['identical'] else 'NO'} | "
            f"{'yes' if r['clean'] else 'NO'} |"
        )
    return lines


def _fanout_section(name: str, records: list[dict[str, Any]], out: Path) -> list[str]:
    lines = []
    groups = sorted({(r["tp"], r.get("consume", "none")) for r in records})
    for tp, consume in groups:
        rows = [r for r in records if r["tp"] == tp and r.get("consume", "none") == consume]
        image = f"{name}_tp{tp}_{consume}_latency.png"
        _plot(
            out / image,
            f"{name}: fan-out latency, TP={tp}, consume={consume}, {rows[0]['hasher']}",
            _series(rows, "size_mb", lambda r: r["latency_ms"]["p50"]),
            "payload (MB)",
            "p50 latency (ms)",
            logx=True,
            logy=True,
            floors=_floors(rows),
        )
        lines.append(f"![{name} TP={tp} consume={consume}]({image})\n")
    lines += [
        "| strategy | transport | input | consume | TP | MB | p50 ms | p99 ms | floor ms |"
        " x floor | CPU ms/req | hashes/req | identical |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        floor = float(r.get("floor_ms", 0))
        x_floor = f"{r['latency_ms']['p50'] / floor:.2f}" if floor else "-"
        lines.append(
            f"| {r['strategy']} | {r['transport']} | {r.get('input', '-')} | "
            f"{r.get('consume', '-')} | {r['tp']} | {r['size_mb']:g} | "
            f"{r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | {floor:.2f} | "
            f"{x_floor} | {r['cpu_ms_per_request']:.1f} | {r['hashes_per_request']:g} | "
            f"{'yes' if r['ranks_identical'] else 'NO'} |"
        )
    return lines


def _load_section(workload: str, records: list[dict[str, Any]], out: Path) -> list[str]:
    throughput, p99 = f"load_{workload}_throughput.png", f"load_{workload}_p99.png"
    _plot(
        out / throughput,
        f"{workload}: throughput against offered rate",
        _series(records, "offered_rps", lambda r: r["achieved_rps"]),
        "offered (requests/s)",
        "achieved (requests/s)",
        diagonal=True,
    )
    _plot(
        out / p99,
        f"{workload}: P99 latency against offered rate",
        _series(records, "offered_rps", lambda r: r["latency_ms"]["p99"]),
        "offered (requests/s)",
        "P99 latency (ms)",
        logy=True,
    )
    lines = [
        f"![{workload}: throughput]({throughput})\n",
        f"![{workload}: P99 latency]({p99})\n",
        "| strategy | transport | offered/s | achieved/s | p50 ms | p99 ms | CPU s/req |"
        " keeps up |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(records, key=lambda r: (r["strategy"], r["transport"], r["offered_rps"])):
        lines.append(
            f"| {r['strategy']} | {r['transport']} | {r['offered_rps']:g} | "
            f"{r['achieved_rps']:.1f} | {r['latency_ms']['p50']:.1f} | "
            f"{r['latency_ms']['p99']:.1f} | {r['cpu_seconds_per_request']:.4f} | "
            f"{'yes' if r['keeps_up'] else 'no'} |"
        )
    return lines


def _serve_section(name: str, records: list[dict[str, Any]], out: Path) -> list[str]:
    image = f"serve_{name}_e2e.png"
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        for q in ("p50", "p99"):
            label = f"{r['images_per_request']} image(s), e2e {q}"
            lines[label].append((float(r["offered_rps"]), float(r["e2e_ms"][q])))
    _plot(
        out / image,
        f"{name}: end-to-end latency against offered rate ({records[0]['base_url']})",
        {k: sorted(v) for k, v in sorted(lines.items())},
        "offered (requests/s)",
        "latency (ms)",
        logy=True,
    )
    rows = [
        f"![{name}: end-to-end latency]({image})\n",
        "| images | MB/req | offered/s | sent/s | done/s | failed | TTFT p50 ms | e2e p50 ms |"
        " e2e p99 ms | keeps up | clients ok |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["images_per_request"], r["offered_rps"])):
        # Records from before the clients' figures lack them: shown as unknown.
        sent = f"{r['sent_rps']:.2f}" if "sent_rps" in r else "-"
        kept = r.get("client_keeps_up")
        clients_ok = "-" if kept is None else "yes" if kept else "no"
        rows.append(
            f"| {r['images_per_request']} | {r['mb_per_request']:.2f} | {r['offered_rps']:g} | "
            f"{sent} | {r['achieved_rps']:.2f} | {r['failed']} | {r['ttft_ms']['p50']:.0f} | "
            f"{r['e2e_ms']['p50']:.0f} | {r['e2e_ms']['p99']:.0f} | "
            f"{'yes' if r['keeps_up'] else 'no'} | {clients_ok} |"
        )
    return rows


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of one ``--json`` file, or a ConfigError that says what is wrong."""
    try:
        records = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a JSON file of benchmark records ({exc})") from None
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        raise ConfigError(f"{path}: not a list of benchmark records")
    return records


def write_report(inputs: list[Path], out: Path) -> Path:
    """Write ``report.md`` and its plots into ``out``; returns the report's path.

    Raises:
        ConfigError: an input is missing, not JSON, or not records of a known benchmark.
    """
    out.mkdir(parents=True, exist_ok=True)
    fanout: dict[str, list[dict[str, Any]]] = {}
    load: dict[str, list[dict[str, Any]]] = defaultdict(list)
    serve: dict[str, list[dict[str, Any]]] = {}
    hosts: dict[str, list[dict[str, Any]]] = {}
    for path in inputs:
        records = _records(path)
        if records[0].get("bench") == "serve":
            serve[path.stem] = records
        elif records[0].get("bench") == "fanout-hosts":
            hosts[path.stem] = records
        elif "offered_rps" in records[0]:
            for r in records:
                load[r["workload"]].append(r)
        elif "size_mb" in records[0]:
            fanout[path.stem] = records
        else:
            raise ConfigError(f"{path}: neither fan-out nor load records")
    lines = ["# mmsched benchmark report", ""]
    lines += [f"Inputs: {', '.join(p.name for p in inputs)}.", ""]
    for name, records in fanout.items():
        lines += [f"## Fan-out: {name}", "", *_fanout_section(name, records, out), ""]
    for workload, records in load.items():
        lines += [f"## Load: {workload}", "", *_load_section(workload, records, out), ""]
    for name, records in serve.items():
        lines += [f"## Serving: {name}", "", *_serve_section(name, records, out), ""]
    for name, records in hosts.items():
        lines += [f"## Several hosts: {name}", "", *_hosts_section(name, records, out), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
