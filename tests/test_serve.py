"""``mmsched serve`` as a user runs it: a real process on 127.0.0.1, driven by the official
``openai`` client (one image, several, streaming, bad input), plus its other endpoints."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
Image = pytest.importorskip("PIL.Image", reason="the serve extra installs Pillow")

from own_run import segments_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mmsched-stub-qwen2-vl"
TP = 2


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> int:
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    port = free_port()
    # The README's command (it installs what is missing, then execs the server), on a free
    # port, with the default config: tokenizer over zmq, the shm store.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSCHED_")}
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "serve.sh"), "--tp", str(TP), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Server(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            if running.get("/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("the server did not become healthy within 120 s")
    yield running
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def png(width: int = 320, height: int = 240, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_part(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict[str, object], text: str = "What is in the image?") -> list[object]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def test_one_image(server: Server) -> None:
    reply = server.client().chat.completions.create(model=MODEL, messages=ask(image_part(png())))
    content = reply.choices[0].message.content
    assert content is not None
    assert content.startswith(f"1 image(s) reached all {TP} rank(s).")
    assert "Prompt: 'What is in the image?'" in content
    assert reply.usage is not None and reply.usage.prompt_tokens > 100  # the image's tokens


def test_several_images_get_their_own_pad_ids(server: Server) -> None:
    urls = [png(seed=1), png(seed=2), png(seed=1)]
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask(*map(image_part, urls))
    )
    content = reply.choices[0].message.content or ""
    assert content.startswith(f"3 image(s) reached all {TP} rank(s).")
    pads = [int(part.split("pad id ")[1].split(".")[0]) for part in content.split("Image ")[1:]]
    assert pads[0] == pads[2] != pads[1]  # equal pixels, equal pad id: the prefix cache key


def test_streaming(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=ask(image_part(png())),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"1 image(s) reached all {TP} rank(s).")
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 5


def test_a_corrupt_image_is_a_400_and_the_next_request_is_served(server: Server) -> None:
    client = server.client()
    corrupt = png()[:-200]  # a truncated PNG: base64 still valid, the image not
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ask(image_part(corrupt)))
    error = info.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[0].content[1].image_url"
    assert "PNG" in error["message"]
    reply = client.chat.completions.create(model=MODEL, messages=ask(image_part(png())))
    assert (reply.choices[0].message.content or "").startswith("1 image(s)")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("data:text/plain;base64,aGVsbG8=", "not accepted"),
        ("https://example.com/cat.png", "only data: URLs"),
        ("data:image/png;base64,!!!notbase64", "invalid base64"),
        (png().replace("image/png", "image/jpeg"), "JPEG"),  # says JPEG, holds PNG
    ],
    ids=["text", "remote", "base64", "mislabelled"],
)
def test_bad_images_are_400s_naming_the_part(server: Server, url: str, problem: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL, messages=ask(image_part(url)))
    assert problem in str(info.value)


def test_other_bad_requests(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=ask())
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert server.post("/v1/chat/completions", b"{not json") == 400
    assert server.post("/v1/chat/completions", b"[1, 2]") == 400
    too_many = ask(*[image_part(png(32, 32))] * 17)
    with pytest.raises(openai.BadRequestError, match="more than 16 images"):
        client.chat.completions.create(model=MODEL, messages=too_many)


def test_models_health_and_metrics(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert server.get("/health") == (200, b'{"status":"ok"}')
    server.client().chat.completions.create(model=MODEL, messages=ask(image_part(png())))
    status, body = server.get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'mmsched_http_responses_total{endpoint="chat",status="200"}' in text
    assert 'mmsched_http_responses_total{endpoint="chat",status="400"}' in text
    count = next(line for line in text.splitlines() if line.startswith("mmsched_images_total"))
    assert int(count.split()[1]) >= 1
    assert "mmsched_request_latency_seconds_bucket" in text


def test_bench_serve_drives_it_and_the_report_plots_it(server: Server, tmp_path: Path) -> None:
    from mmsched.cli import main

    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", f"{server.url}/v1", "--rates", "4", "--images", "1,2"]
    argv += ["--requests", "6", "--image-size", "256x192", "--json", str(out)]
    assert main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["images_per_request"], r["completed"], r["failed"]) for r in records] == [
        (1, 6, 0),
        (2, 6, 0),
    ]
    for r in records:
        assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]
        assert r["model"] == MODEL
    assert main(["bench", "report", str(out), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Serving: serve" in report
    assert (tmp_path / "report" / "serve_serve_e2e.png").stat().st_size > 0


def test_sigint_stops_the_server_and_its_ranks_cleanly(server: Server) -> None:
    # Last in this module: it stops the module's server.
    pid = server.process.pid
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(60) == 0
    assert segments_of([pid]) == set()  # the payload store's segment is gone
