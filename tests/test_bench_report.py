"""``mmsched bench report``: the published results become a report with real plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsched import ConfigError
from mmsched.cli import main

RESULTS = Path(__file__).parent.parent / "docs" / "results"


def test_report_from_the_published_results(tmp_path: Path) -> None:
    inputs = [
        RESULTS / "fanout_tp4_none.json",
        RESULTS / "zero_copy_tp1_tp8.json",
        RESULTS / "load_image_tp4_copy_run1.json",
        RESULTS / "load_image_tp4_arena.json",
    ]
    assert main(["bench", "report", *map(str, inputs), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Fan-out: fanout_tp4_none" in report and "## Load: image" in report
    assert "| per-rank | torch | copy | none | 4 | 100 |" in report
    assert "| zero-copy | zmq | arena | none | 4 | 100 |" in report
    images = [
        "fanout_tp4_none_tp4_none_latency.png",
        "zero_copy_tp1_tp8_tp1_none_latency.png",
        "zero_copy_tp1_tp8_tp8_none_latency.png",
        "load_image_throughput.png",
        "load_image_p99.png",
    ]
    for image in images:
        assert f"]({image})" in report
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / image).stat().st_size > 10_000  # a drawn plot, not an empty canvas


def test_report_from_the_published_multi_host_runs(tmp_path: Path) -> None:
    inputs = [RESULTS / "hosts_tp8_run1.json", RESULTS / "hosts3_tp12.json"]
    assert main(["bench", "report", *map(str, inputs), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Several hosts: hosts_tp8_run1" in report
    assert "| 100 | 56.12 | 61.75 | 9.46 | 39.56 | 1.42 | 1.0004 | yes | yes |" in report
    image = tmp_path / "hosts3_tp12_hosts_latency.png"
    assert "](hosts3_tp12_hosts_latency.png)" in report
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000


def test_report_refuses_other_json(tmp_path: Path) -> None:
    other = tmp_path / "x.json"
    other.write_text('[{"a": 1}]')
    from mmsched.bench.report import write_report

    with pytest.raises(ConfigError, match="neither fan-out nor load"):
        write_report([other], tmp_path / "out")


def test_a_missing_or_foreign_file_is_an_error_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmsched.cli import main

    not_json = tmp_path / "notes.txt"
    not_json.write_text("fanout was fast\n")
    for path in (tmp_path / "missing.json", not_json):
        assert main(["bench", "report", str(path), "--out", str(tmp_path / "r")]) == 2
        out = capsys.readouterr().out
        assert "error:" in out and path.name in out and "Traceback" not in out
