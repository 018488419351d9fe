"""``mmsched serve --api-servers 2`` as a user runs it: a real server (two HTTP processes on
one port, one engine process with its ranks), real connections, the official ``openai``
client. Chat with images, streaming, the same HTTP errors as one process, ``/metrics``
summed over both processes, a dead HTTP process replaced, and SIGTERM leaving nothing."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
import zmq.asyncio

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
pytest.importorskip("prometheus_client", reason="the serve extra installs prometheus-client")

from own_run import segments_of  # noqa: E402
from test_serve import (  # noqa: E402
    MODEL,
    TP,
    Server,
    ask,
    clean_env,
    exited,
    image_part,
    png,
    sigterm_mid_request,
    start_server,
)

SHUTDOWN_TIMEOUT_S = 2.0
FRONTEND = "mmsched.serve.frontend"


def fronts(server: Server) -> list[psutil.Process]:
    """The server's HTTP processes (its direct children running the frontend)."""
    found = []
    for child in psutil.Process(server.process.pid).children():
        with contextlib.suppress(psutil.Error):  # one just killed: a zombie until reaped
            if FRONTEND in " ".join(child.cmdline()):
                found.append(child)
    return found


def workdir(server: Server) -> Path:
    """The directory of the engine's socket and the metrics' files."""
    spec = json.loads(fronts(server)[0].cmdline()[-1])
    return Path(spec["engine"].removeprefix("ipc://")).parent


def listening(front: psutil.Process, port: int) -> bool:
    try:
        sockets = front.net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets)


def wait_listening(server: Server, count: int, timeout_s: float = 90) -> list[psutil.Process]:
    """The server's HTTP processes once ``count`` of them listen on its port (each starts
    listening once it has met the engine)."""
    port = int(server.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = [p for p in fronts(server) if not exited(p) and listening(p, port)]
        if len(ready) == count:
            return ready
        time.sleep(0.2)
    pytest.fail(f"{count} HTTP processes did not listen within {timeout_s:g} s")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    command = [str(Path(sys.executable).parent / "mmsched"), "serve", "--tp", str(TP)]
    command += ["--api-servers", "2"]
    running = start_server(command, clean_env(MMSCHED_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S)))
    wait_listening(running, 2)
    yield running
    if running.process.poll() is None:  # a test failed before the last one stopped it
        running.process.send_signal(signal.SIGTERM)
        try:
            running.process.wait(60)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(60)


def owners(server: Server, count: int) -> dict[int, list[http.client.HTTPConnection]]:
    """``count`` keep-alive connections, by the pid of the HTTP process that accepted each."""
    port = int(server.url.rsplit(":", 1)[1])
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(count)]
    for c in connections:
        c.connect()
    time.sleep(0.5)  # every accept done
    by_port = {c.sock.getsockname()[1]: c for c in connections}
    found: dict[int, list[http.client.HTTPConnection]] = {}
    for front in fronts(server):
        for conn in front.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port in by_port:
                found.setdefault(front.pid, []).append(by_port[conn.raddr.port])
    return found


def chat_over(connection: http.client.HTTPConnection, **fields: object) -> tuple[int, dict]:
    body = {"model": MODEL, "messages": ask(image_part(png(64, 48))), **fields}
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_two_http_processes_share_the_port_and_both_serve_chat_with_images(
    server: Server,
) -> None:
    assert len(fronts(server)) == 2
    found = owners(server, 16)
    assert len(found) == 2, found  # the kernel spread the connections over both
    for connections in found.values():
        status, body = chat_over(connections[0])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].startswith(
            f"1 image(s) reached all {TP} rank(s)."
        )
    for connections in found.values():
        for c in connections:
            c.close()


def test_several_images_and_streaming(server: Server) -> None:
    client = server.client()
    urls = [png(seed=1), png(seed=2), png(seed=1)]
    reply = client.chat.completions.create(model=MODEL, messages=ask(*map(image_part, urls)))
    content = reply.choices[0].message.content or ""
    assert content.startswith(f"3 image(s) reached all {TP} rank(s).")
    pads = [int(part.split("pad id ")[1].split(".")[0]) for part in content.split("Image ")[1:]]
    assert pads[0] == pads[2] != pads[1]
    assert reply.usage is not None and reply.usage.prompt_tokens > 100
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask(image_part(png())),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"1 image(s) reached all {TP} rank(s).")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 5


def test_a_completion_says_where_its_time_went_as_one_process_does(server: Server) -> None:
    found = owners(server, 1)
    connection = next(iter(found.values()))[0]
    body = {"model": MODEL, "messages": ask(image_part(png(seed=7)))}
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    header = response.getheader("x-mmsched-timing") or ""
    response.read()
    connection.close()
    parts = {k: float(v) for k, v in (p.split("=") for p in header.split(";"))}
    assert list(parts) == ["read", "key", "process", "prepare", "pipeline"], header
    assert all(v >= 0 for v in parts.values()), header
    assert parts["read"] + parts["key"] + parts["process"] <= parts["prepare"] + 0.05, header


@pytest.mark.parametrize(
    ("fields", "status", "kind", "param", "words"),
    [
        ({"model": "nope"}, 404, "model_not_found", "model", "does not exist"),
        ({"tools": []}, 400, "invalid_request_error", "tools", "not supported"),
        (
            {"messages": ask(image_part(png()[:-200]))},  # base64 valid, the PNG truncated
            400,
            "invalid_request_error",
            "messages[0].content[1].image_url",
            "PNG",
        ),
        (
            {"messages": ask(image_part("data:text/plain;base64,aGVsbG8="))},
            400,
            "invalid_request_error",
            "messages[0].content[1].image_url",
            "not accepted",
        ),
        (
            {"messages": ask(*[image_part(png(32, 32))] * 17)},
            400,
            "invalid_request_error",
            "messages[0]",
            "more than 16 images",
        ),
        (
            {"messages": ask(text="x" * 40_000)},
            400,
            "invalid_request_error",
            "messages",
            "max_prompt_tokens",
        ),
    ],
)
def test_errors_are_the_same_http_errors_as_one_process_gives(
    server: Server, fields: dict[str, object], status: int, kind: str, param: str, words: str
) -> None:
    got, body = server.chat(**fields)
    assert got == status, body
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, param, status)
    assert words in error["message"]
    assert server.post("/v1/chat/completions", b"{not json") == 400
    got, _ = server.chat(messages=ask(image_part(png(64, 48))))
    assert got == 200  # and the next request is served


def test_metrics_sum_both_processes(server: Server) -> None:
    found = owners(server, 16)
    assert len(found) == 2, found
    before = server.responses(200)
    for connections in found.values():
        for c in connections[:2]:
            assert chat_over(c)[0] == 200
    # Whichever process answers /metrics, it counts the other's requests too.
    for connections in found.values():
        connections[0].request("GET", "/metrics")
        text = connections[0].getresponse().read().decode()
        key = 'mmsched_http_responses_total{endpoint="chat",status="200"}'
        line = next(ln for ln in text.splitlines() if ln.startswith(key))
        assert int(float(line.split()[1])) == before + 4
        assert "mmsched_preprocess_images_total" in text  # the engine's figures too
        assert "mmsched_request_bytes_sent_total" in text
        inflight = next(ln for ln in text.splitlines() if ln.startswith("mmsched_inflight"))
        assert float(inflight.split()[1]) == 0
    for connections in found.values():
        for c in connections:
            c.close()


def test_a_dead_http_process_is_replaced(server: Server) -> None:
    victim = fronts(server)[0]
    victim.kill()
    psutil.wait_procs([victim], timeout=30)  # gone once the server has reaped it
    ready = wait_listening(server, 2)
    assert victim.pid not in [p.pid for p in ready]  # another took its place
    assert server.get("/health")[0] == 200
    found = owners(server, 16)
    assert len(found) == 2  # and it is given connections
    for connections in found.values():
        for c in connections:
            c.close()
    for _ in range(4):
        assert server.chat()[0] == 200


def test_sigterm_stops_every_process_and_leaves_nothing(server: Server) -> None:
    # Last in this module: it stops the module's server.
    process = psutil.Process(server.process.pid)
    everything = process.children(recursive=True)
    assert len(everything) >= TP + 2  # the ranks and the two HTTP processes at least
    directory = workdir(server)
    assert directory.is_dir()
    answer, stopped, _ = sigterm_mid_request(server)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"shutdown_timeout_s=2" in answer
    try:
        rc = server.process.wait(SHUTDOWN_TIMEOUT_S + 20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        pytest.fail(f"not stopped in time: {server.process.communicate()[0]}")
    output = server.process.stdout.read() if server.process.stdout else ""
    assert rc == 0, output
    assert time.monotonic() - stopped < SHUTDOWN_TIMEOUT_S + 20
    alive = psutil.wait_procs(everything, timeout=10)[1]
    assert [p for p in alive if not exited(p)] == []
    assert segments_of([process.pid, *(p.pid for p in everything)]) == set()
    assert not directory.exists()  # the socket and the metrics' files


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "another-server"])
def test_a_port_another_program_holds_stops_the_server_with_status_1(reuseport: bool) -> None:
    """Held by a plain socket, or by one with SO_REUSEPORT as another server's HTTP processes
    hold theirs (which the new server's processes could otherwise join): refused before any
    rank or HTTP process starts."""
    with socket.socket() as holder:
        if reuseport:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [str(Path(sys.executable).parent / "mmsched"), "serve", "--tp", str(TP)]
        command += ["--api-servers", "2", "--port", str(port)]
        process = psutil.Popen(
            command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            output = process.communicate(timeout=180)[0]
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 1, output
    assert f"127.0.0.1:{port} is in use: not serving" in output


def test_an_engine_that_does_not_answer_is_a_503_and_is_told_to_drop_it(tmp_path: Path) -> None:
    """In-process: the HTTP side's end of the hop, against an engine that never answers."""
    from mmsched.serve.app import _HttpError
    from mmsched.serve.frontend import EngineClient

    async def main() -> None:
        address = f"ipc://{tmp_path}/engine"
        context = zmq.asyncio.Context()
        silent = context.socket(zmq.ROUTER)
        silent.bind(address)
        client = EngineClient(address, 0, timeout_s=0.3)
        client.connect()
        try:
            call, queue = client.open(b"chat", {"rid": "r"}, [b"image bytes"])
            started = time.monotonic()
            with pytest.raises(_HttpError) as info:
                await client.next(queue, 0.3)
            assert 0.25 < time.monotonic() - started < 2.0
            assert info.value.status == 503 and "did not answer within 0.3 s" in info.value.message
            client.close(call, cancel=True)
            frames = await asyncio.wait_for(silent.recv_multipart(), 5)
            assert frames[1] == b"chat" and frames[3] == b"image bytes"
            assert json.loads(frames[2]) == {"rid": "r", "id": call}
            frames = await asyncio.wait_for(silent.recv_multipart(), 5)
            assert frames[1] == b"cancel" and json.loads(frames[2]) == {"id": call}
        finally:
            await client.aclose()
            silent.close(linger=0)
            context.term()

    asyncio.run(main())


def test_an_images_header_reaches_the_engine_as_read_and_a_malformed_one_is_a_400() -> None:
    """In-process: the HTTP process's entry of an image, through JSON, read by the engine,
    which checks the header it is told of before its backend sizes any work by it."""
    from types import SimpleNamespace

    import orjson

    from mmsched.serve.apiservers import Engine, _received_images
    from mmsched.serve.chat import ChatProcessor
    from mmsched.serve.frontend import _image_entry
    from mmsched.serve.media import EncodedImage, ImageHeader, MediaLimits

    limits = MediaLimits()
    sent = [
        EncodedImage(
            "messages[0].content[1].image_url", b"jpeg bytes", "JPEG", ImageHeader(64, 32, 6)
        ),
        EncodedImage("messages[0].content[2].image_url", b"png bytes", "PNG"),  # none read
    ]
    entries = orjson.loads(orjson.dumps([_image_entry(image) for image in sent]))
    frames = [zmq.Frame(image.data) for image in sent]
    received = _received_images(entries, frames, limits)
    assert [(i.param, bytes(i.data), i.format, i.header) for i in received] == [
        (i.param, i.data, i.format, i.header) for i in sent
    ]

    async def answer(fields: list[object]) -> dict[str, object]:
        config = SimpleNamespace(max_prompt_tokens=None)
        engine = Engine(config, ChatProcessor(limits=limits), None, b"id", False)  # type: ignore[arg-type]
        answers: list[dict[str, object]] = []
        engine._send = lambda who, message: answers.append(message)  # type: ignore[method-assign]
        try:
            call = {
                "rid": "r",
                "sampling": {},
                "images": [["messages[0].content[1].image_url", "JPEG", *fields]],
                "keys": ["00" * 16],
                "layout": [[1, 2], 0],
                "stream": False,
                "max_tokens": None,
            }
            await engine._chat(b"http-0-1", 7, call, [zmq.Frame(b"jpeg bytes")])
        finally:
            await engine.aclose()
        [reply] = answers
        return reply

    for fields, problem in (
        ([64, 32, 9], "EXIF orientation is not 1 to 8"),
        ([0, 32, 1], "width is not a positive int"),
        ([100_000, 100_000, 1], "more than 40,000,000 pixels"),
        ([64, 32], "expected a header"),
    ):
        reply = asyncio.run(answer(fields))
        assert reply["id"] == 7, reply
        error = reply["error"]
        assert isinstance(error, dict) and error["status"] == 400, reply
        assert error["kind"] == "invalid_request_error", reply
        assert error["param"] == "messages[0].content[1].image_url", reply
        assert problem in error["message"], reply


def test_the_engine_lets_a_requests_image_bytes_go_once_its_images_are_processed() -> None:
    """In-process: the frames a chat call came with are not held while it generates."""
    import gc
    import weakref
    from types import SimpleNamespace

    from mmsched.errors import NotRunning
    from mmsched.serve.apiservers import Engine
    from mmsched.serve.chat import PreparedChat
    from mmsched.serve.media import MediaLimits

    class Frame:  # as zmq.Frame (its buffer), and weakly referenced
        def __init__(self, data: bytes) -> None:
            self.buffer = memoryview(data)

    frame = Frame(b"png bytes")
    held = weakref.ref(frame)
    frames = [frame]
    del frame
    processed: list[bool] = []
    generating: list[bool] = []

    async def process_read(read: object) -> PreparedChat:
        processed.append(held() is not None)
        return PreparedChat([1, 2, 3], None)

    async def generate(*args: object) -> object:
        gc.collect()
        generating.append(held() is not None)
        raise NotRunning("stopped")

    async def main(frames: list[Frame]) -> list[dict[str, object]]:
        chat = SimpleNamespace(limits=MediaLimits(), process_read=process_read)
        pipeline = SimpleNamespace(generate=generate)
        config = SimpleNamespace(max_prompt_tokens=None)
        engine = Engine(config, chat, pipeline, b"id", False)  # type: ignore[arg-type]
        answers: list[dict[str, object]] = []
        engine._send = lambda who, message: answers.append(message)  # type: ignore[method-assign]
        call = {
            "rid": "r",
            "sampling": {},
            "images": [["messages[0].content[1].image_url", "PNG"]],
            "keys": ["00" * 16],
            "layout": [[1, 2], 0],
            "stream": False,
            "max_tokens": None,
        }
        chatting = engine._chat(b"http-0-1", 7, call, list(frames))  # type: ignore[arg-type]
        frames.clear()  # the call's own list holds the frame now, as a received one's does
        try:
            await chatting
        finally:
            await engine.aclose()
        return answers

    answers = asyncio.run(main(frames))
    assert processed == [True] and generating == [False], (processed, generating)
    assert [a["error"]["status"] for a in answers] == [503], answers  # type: ignore[index]
