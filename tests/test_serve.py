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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
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

    def chat(self, **fields: object) -> tuple[int, dict[str, Any]]:
        """POST a chat body of exactly ``fields`` (model and a short message by default)."""
        body = {"model": MODEL, "messages": ask(), **fields}
        request = urllib.request.Request(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def responses(self, status: int) -> int:
        """``/metrics``' count of chat responses with ``status``."""
        text = self.get("/metrics")[1].decode()
        key = f'mmsched_http_responses_total{{endpoint="chat",status="{status}"}}'
        line = next((ln for ln in text.splitlines() if ln.startswith(key)), None)
        return int(float(line.split()[1])) if line else 0  # the exposition writes floats


def sigterm_mid_request(server: Server) -> tuple[bytes, float, float]:
    """Start a chat request whose body never comes, SIGTERM the server, and read its answer
    to the end: the answer, when the signal went, and how long the answer took after it."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        head += "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        sock.sendall(head.encode() + b'{"model": "')  # ... and the rest never comes
        time.sleep(0.5)
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        sock.settimeout(SHUTDOWN_TIMEOUT_S + 10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, stopped, time.monotonic() - stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(command: list[str], env: dict[str, str], wait_s: float = 120) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Server(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            if running.get("/health")[0] == 200:
                return running
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the server did not become healthy within {wait_s:g} s")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSCHED_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # The README's command, on a free port, with the default config: tokenizer over zmq, the
    # shm store. scripts/serve.sh installs what is missing, then ends in
    # `exec .venv/bin/mmsched serve "$@"` (test_documented_commands checks that line): that
    # line runs here, without the install step, which would reinstall the project into the
    # environment these tests run in while they run (and costs a pip run per module).
    command = [str(Path(sys.executable).parent / "mmsched"), "serve", "--tp", str(TP)]
    running = start_server(command, clean_env())
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGINT)
        running.process.wait(60)


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
    assert float(count.split()[1]) >= 1
    assert "mmsched_request_latency_seconds_bucket" in text


def test_a_completion_says_where_its_time_went(server: Server) -> None:
    body = {"model": MODEL, "messages": ask(image_part(png(seed=7)))}
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        header = response.headers["x-mmsched-timing"]
    parts = {k: float(v) for k, v in (p.split("=") for p in header.split(";"))}
    assert list(parts) == ["read", "key", "process", "prepare", "pipeline"], header
    assert all(v >= 0 for v in parts.values()), header
    assert parts["read"] + parts["key"] + parts["process"] <= parts["prepare"] + 0.05, header


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
    # Run again, another seed: fresh images, every one processed (the same seed's would
    # all be the cache's).
    assert main([*argv[:-2], "--images", "1", "--seed", "5", "--json", str(out)]) == 0
    [again] = json.loads(out.read_text())
    assert again["seed"] == 5 and again["completed"] == 6
    assert again["server_images"]["processed"] == 6 + again["warmup_images"]
    assert main(["bench", "report", str(out), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Serving: serve" in report
    assert (tmp_path / "report" / "serve_serve_e2e.png").stat().st_size > 0


def preprocess_images(server: Server, outcome: str) -> int:
    """``/metrics``' count of images the preprocessing stage gave ``outcome``."""
    text = server.get("/metrics")[1].decode()
    key = f'mmsched_preprocess_images_total{{outcome="{outcome}"}}'
    line = next((ln for ln in text.splitlines() if ln.startswith(key)), None)
    return int(float(line.split()[1])) if line else 0  # the exposition writes floats


def test_bench_serve_from_two_processes_with_repeats(server: Server, tmp_path: Path) -> None:
    from mmsched.bench.serve import plan
    from mmsched.cli import main

    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", f"{server.url}/v1", "--rates", "8", "--images", "1"]
    argv += ["--requests", "10", "--image-size", "128x96", "--clients", "2", "--repeat", "0.5"]
    cached = preprocess_images(server, "cached") + preprocess_images(server, "joined")
    assert main([*argv, "--json", str(out)]) == 0
    [r] = json.loads(out.read_text())
    assert (r["requests"], r["completed"], r["failed"], r["clients"]) == (10, 10, 0, 2)
    # The schedule is drawn once: the same seed gives the run's repeats.
    expected = plan(10, 1, 8.0, 0.5, hash((0, 1, 8.0)) & 0xFFFFFFFF)
    assert r["repeated"] == sum(p.repeat for p in expected) > 0
    assert preprocess_images(server, "cached") + preprocess_images(server, "joined") >= (
        cached + r["repeated"]
    )  # every repeat was answered by the cache (or joined its first sending)
    # The clients' side: what they sent, and how late.
    assert r["sent_rps"] > 0 and r["client_lag_ms"]["max"] >= r["client_lag_ms"]["p50"] >= 0
    assert isinstance(r["client_keeps_up"], bool) and r["client_cpu_ms_per_request"] > 0
    # The server's split, the repeats' processing apart from the fresh images'.
    for part in ("read", "key", "process", "prepare", "pipeline"):
        assert r[f"server_{part}_ms"]["p50"] > 0, part
    assert r["server_process_repeat_ms"]["p50"] < r["server_process_ms"]["p50"]
    assert r["server_repeat_ms"]["p50"] > 0 and r["server_ms"]["p50"] > 0
    # Its stage's counters over the point: each fresh image processed once (the clients'
    # warm-up's too), every repeat answered without it.
    fresh = r["requests"] - r["repeated"] + r["warmup_images"]
    images = r["server_images"]
    assert images["processed"] == fresh and r["warmup_images"] == 4
    assert images["cached"] + images["joined"] == r["repeated"] and images["refused"] == 0


def test_a_schedule_repeats_only_images_already_due() -> None:
    from mmsched.bench.serve import plan
    from mmsched.errors import ConfigError

    planned = plan(400, 2, 100.0, 0.25, seed=3)
    assert [p.index for p in planned] == list(range(400))
    dues = [p.due_s for p in planned]
    assert dues == sorted(dues) and len(set(dues)) == len(dues)
    assert not planned[0].repeat and 60 < sum(p.repeat for p in planned) < 140
    seen: set[int] = set()
    for p in planned:
        assert len(p.images) == 2
        assert p.repeat == (set(p.images) <= seen)  # a repeat's images were sent before it
        seen |= set(p.images)
    assert len(seen) == 2 * sum(not p.repeat for p in planned)  # the rest: fresh each
    assert not any(p.repeat for p in plan(50, 1, 10.0, 0.0, seed=3))
    with pytest.raises(ConfigError, match="repeat"):
        plan(1, 1, 1.0, 1.5, seed=0)


def data_url(image: Any, fmt: str = "PNG", **save: object) -> str:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    media_type = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{media_type};base64," + base64.b64encode(out.getvalue()).decode()


def pad_ids(server: Server, *urls: str) -> list[int]:
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask(*map(image_part, urls))
    )
    content = reply.choices[0].message.content or ""
    return [int(part.split("pad id ")[1].split(".")[0]) for part in content.split("Image ")[1:]]


def test_images_reach_the_ranks_as_the_processor_sees_them(server: Server) -> None:
    """Each awkward image is processed into the features of the plain RGB image a direct
    processor call would see (composited on white, upright, 8-bit), by the server's own
    preprocessing path; and is keyed by its own bytes: another encoding of the same pixels
    is other media to the ranks (another pad id)."""
    import asyncio

    import torch
    from PIL import ImageOps

    from mmsched import Config
    from mmsched.preprocess import Preprocessor, StageSettings
    from mmsched.serve.chat import ChatProcessor
    from mmsched.serve.media import MediaLimits

    rgba = np.zeros((240, 320, 4), dtype=np.uint8)
    rgba[60:180, 80:240, 3] = 255  # a black logo on a transparent background
    on_white = np.full((240, 320, 3), 255, dtype=np.uint8)
    on_white[60:180, 80:240] = 0
    logo, la = Image.fromarray(rgba), Image.fromarray(rgba).convert("LA")
    stored = np.random.default_rng(3).integers(0, 255, (280, 560, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 280 wide, 560 high
    jpeg = data_url(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(base64.b64decode(jpeg.split(",")[1]))))
    ramp = np.linspace(0, 0xFFFF, 240 * 320).reshape(240, 320).astype(np.uint16)
    grey8 = Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGB")
    pairs = [
        (data_url(logo), data_url(Image.fromarray(on_white))),
        (data_url(la), data_url(Image.fromarray(on_white))),
        (jpeg, data_url(upright)),
        (data_url(Image.fromarray(ramp)), data_url(grey8)),
    ]

    async def features(*urls: str) -> list[torch.Tensor]:
        # float32 features, as a direct processor call returns them (uint8 is tested beside the
        # pixels it carries)
        stage = Preprocessor(
            StageSettings.of(Config(preprocess_cache_mb=0, wire_pixels="float32")), MediaLimits()
        )
        await stage.start(None)
        try:
            chat = ChatProcessor(preprocessor=stage)
            prepared = await chat.prepare_async(ask(*map(image_part, urls)))
            assert prepared.mm_inputs is not None
            return [item["feature"] for item in prepared.mm_inputs["mm_items"]]
        finally:
            await stage.aclose()

    for awkward, plain in pairs:
        first, second = asyncio.run(features(awkward, plain))
        assert torch.equal(first, second)
        assert len(set(pad_ids(server, awkward, plain))) == 2  # keyed by their own bytes
    reply = server.client().chat.completions.create(model=MODEL, messages=ask(image_part(jpeg)))
    assert "resized to 280x560" in (reply.choices[0].message.content or "")


def test_n_other_than_one_is_refused(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL, messages=ask(), n=2)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"
    assert "one choice" in info.value.body["message"]
    reply = server.client().chat.completions.create(model=MODEL, messages=ask(), n=1)
    assert len(reply.choices) == 1


def test_both_token_caps_null_is_not_given_and_the_smaller_wins(server: Server) -> None:
    status, body = server.chat(max_tokens=1, max_completion_tokens=None)
    assert (status, body["usage"]["completion_tokens"]) == (200, 1)
    assert body["choices"][0]["finish_reason"] == "length"
    status, body = server.chat(max_tokens=None, max_completion_tokens=2)
    assert (status, body["usage"]["completion_tokens"]) == (200, 2)
    status, body = server.chat(max_tokens=5, max_completion_tokens=3)
    assert (status, body["usage"]["completion_tokens"]) == (200, 3)
    status, body = server.chat(max_completion_tokens=0)
    assert (status, body["error"]["param"]) == (400, "max_completion_tokens")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"temperature": 0.7}, "temperature"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"best_of": 2}, "best_of"),  # not an OpenAI chat field at all
    ],
    ids=["tools", "temperature", "json", "logprobs", "stop", "unknown"],
)
def test_fields_the_server_does_not_honour_are_400s_naming_them(
    server: Server, fields: dict[str, object], param: str
) -> None:
    status, body = server.chat(**fields)
    assert status == 400
    assert body["error"]["param"] == param
    assert body["error"]["message"].startswith(f"{param}: not supported by this server")


def test_fields_that_ask_nothing_else_are_accepted(server: Server) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL,
        messages=ask(),
        temperature=0,
        top_p=1,
        seed=7,
        user="someone",
        frequency_penalty=0,
        presence_penalty=0,
        logprobs=False,
        stream_options=None,
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert (reply.choices[0].message.content or "").startswith("0 image(s)")


def test_a_client_hanging_up_mid_body_is_a_499_not_a_500(server: Server) -> None:
    before_500, before_499 = server.responses(500), server.responses(499)
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        head += "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        sock.sendall(head.encode() + b'{"model": "' + MODEL.encode())
        time.sleep(0.5)  # the server is reading the body now
    deadline = time.monotonic() + 10
    while server.responses(499) == before_499 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.responses(499) == before_499 + 1
    assert server.responses(500) == before_500
    assert server.get("/health")[0] == 200


class HealthWatch:
    """Polls ``/health`` from a thread; the slowest answer is how long the loop stalled."""

    def __init__(self, server: Server) -> None:
        import threading

        self.server, self.slowest, self.polls = server, 0.0, 0
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.statuses.add(self.server.get("/health")[0])
            self.slowest = max(self.slowest, time.perf_counter() - started)
            self.polls += 1
            time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_prompt_over_the_token_bound_is_a_400_naming_it(server: Server) -> None:
    text = "x" * (10 << 20)  # 10 MB of text: 10 million byte tokens
    with HealthWatch(server) as watch:
        started = time.perf_counter()
        status, body = server.chat(messages=ask(text=text))
        took = time.perf_counter() - started
    assert status == 400 and body["error"]["param"] == "messages"
    assert "more than max_prompt_tokens=32,768" in body["error"]["message"]
    assert took < 3.0, took
    assert watch.polls > 0 and watch.statuses == {200}
    # The loop is never held (decoding and filtering 10 million ids on it took 1.5 s); the
    # margin is for the 2-core machine the ranks and other jobs share.
    assert watch.slowest < 1.0, watch.slowest
    status, body = server.chat(messages=ask(text="x" * 32_000))  # under the bound: served
    assert status == 200


def test_sigint_stops_the_server_and_its_ranks_cleanly(server: Server) -> None:
    # Last in this module: it stops the module's server.
    pid = server.process.pid
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(60) == 0
    assert segments_of([pid]) == set()  # the payload store's segment is gone


SHUTDOWN_TIMEOUT_S = 2.0


def exited(process: psutil.Process) -> bool:
    """Gone, or a zombie: dead, waiting for a reaper (a container without init has none)."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def bounded_server() -> Iterator[Server]:
    """A second server (after the module's first has stopped): a short stop bound, and a
    tokenizer that takes a second to encode and to decode a text that asks for it."""
    command = [sys.executable, str(ROOT / "tests" / "slow_tokenizer_server.py")]
    env = clean_env(MMSCHED_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S), MMSCHED_TP_SIZE=str(TP))
    running = start_server(command, env)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(60)


def test_a_prompt_is_prepared_off_the_event_loop(bounded_server: Server) -> None:
    # Encoding (before the pipeline) and decoding (the reply) take a second each here.
    with HealthWatch(bounded_server) as watch:
        started = time.perf_counter()
        status, body = bounded_server.chat(messages=ask(text="Describe it slowly."))
        took = time.perf_counter() - started
    assert status == 200, body
    assert "slowly" in body["choices"][0]["message"]["content"]
    assert took >= 2.0 and watch.polls > 10 and watch.statuses == {200}
    # The loop never waits for the tokenizer (decoding on it stalled /health for 1 s).
    assert watch.slowest < 0.5, watch.slowest


def test_the_prompt_bound_holds_for_a_processor_of_ones_own(bounded_server: Server) -> None:
    status, body = bounded_server.chat(messages=ask(text="x" * 40_000))
    assert (status, body["error"]["param"]) == (400, "messages")
    assert "more than max_prompt_tokens=32,768" in body["error"]["message"]


def test_sigterm_with_a_client_mid_request_ends_everything_within_the_bound(
    bounded_server: Server,
) -> None:
    # Last in this module: it stops the bounded server.
    process = psutil.Process(bounded_server.process.pid)
    ranks = process.children(recursive=True)
    assert len(ranks) >= TP
    answer, stopped, answered = sigterm_mid_request(bounded_server)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"shutdown_timeout_s=2" in answer
    assert SHUTDOWN_TIMEOUT_S - 0.5 < answered < SHUTDOWN_TIMEOUT_S + 2, answered
    # The server, then its ranks: gone within the bound plus the pipeline's close.
    rc = bounded_server.process.wait(SHUTDOWN_TIMEOUT_S + 10)
    ended = time.monotonic() - stopped
    output = bounded_server.process.stdout.read() if bounded_server.process.stdout else ""
    assert rc in (0, -signal.SIGTERM), output  # SIGTERM re-raised once everything is closed
    # The bound, then the pipeline's close: the ranks' own exit, 1-6 s on this 2-core
    # machine (uvicorn alone waited for the client, however long).
    assert ended < SHUTDOWN_TIMEOUT_S + 10, ended
    left = stopped + SHUTDOWN_TIMEOUT_S + 10 - time.monotonic()
    alive = psutil.wait_procs(ranks, timeout=max(0.1, left))[1]
    assert [p for p in alive if not exited(p)] == []  # no rank outlives it
    assert segments_of([process.pid, *(rank.pid for rank in ranks)]) == set()
