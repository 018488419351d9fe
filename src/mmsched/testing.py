"""Test helpers: the contracts every transport and every payload store must pass,
rank-side callbacks, and faults to inject into a running pipeline.

The transport contract ([`run_contract_rank`][]) is one scenario run on every rank of a
group: the sender sends [`CONTRACT_MESSAGES`][] and closes; each receiver returns what it
got, message by message, as (length, BLAKE3) of each frame, plus what happened after the
end. A new transport passes when every receiver's result equals
[`expected_contract_result`][].

The store contract ([`run_store_contract`][]) makes a store's writer in this process and its
readers in processes of their own (or in this one, for a store whose references do not
cross processes), and checks what every store promises: see its docstring. A new store
passes when the result has no failures.

Helpers live in the package, not in ``tests/``, because rank processes started with
``spawn`` must be able to import them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import blake3
import torch

from mmsched.errors import ArenaFull, EndOfStream, MmschedError, NotRunning, TransportClosed
from mmsched.messages import TokenizedGenerateReqInput
from mmsched.stores import STORES, PayloadRef, PayloadStore, StoreOptions, store_class
from mmsched.transports import GroupSpec, Transport, open_transport

if TYPE_CHECKING:
    from mmsched.pipeline import Pipeline

_BIG = 3 * (1 << 20) + 17  # larger than any chunk a transport might cut at, and odd


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


CONTRACT_MESSAGES: list[list[bytes]] = [
    [b"first"],
    [],  # a message with no frames
    [b""],  # one empty frame
    [b"a", b"", b"ccc"],  # empty frame in the middle: boundaries must survive
    [_pattern(_BIG, 1)],
    [b"header", _pattern(_BIG, 2), _pattern(1000, 3)],
    *[[f"seq-{i}".encode()] for i in range(50)],  # order under a burst
]


def _summary(frames: list[Any]) -> list[tuple[int, str]]:
    return [(memoryview(f).nbytes, blake3.blake3(f).hexdigest()) for f in frames]


def expected_contract_result() -> dict[str, Any]:
    """What every receiver of [`run_contract_rank`][] must return for a transport to pass."""
    return {
        "messages": [_summary(m) for m in CONTRACT_MESSAGES],
        "after_end": "EndOfStream",
        "after_close": "TransportClosed",
    }


async def run_contract_rank(transport: Transport) -> dict[str, Any]:
    """Run the contract scenario on one rank; returns what this rank observed."""
    if transport.is_sender:
        for message in CONTRACT_MESSAGES:
            await transport.send(message)
        await transport.aclose()
        try:
            await transport.send([b"late"])
            after_close = "no error"
        except TransportClosed:
            after_close = "TransportClosed"
        return {"after_close": after_close, "stats": vars(transport.statistics())}

    received: list[list[tuple[int, str]]] = []
    while True:
        try:
            received.append(_summary(await transport.recv()))
        except EndOfStream:
            break
    try:
        await transport.recv()
        after_end = "no error"
    except EndOfStream:
        after_end = "EndOfStream"
    await transport.aclose()
    try:
        await transport.recv()
        after_close = "no error"
    except TransportClosed:
        after_close = "TransportClosed"
    return {
        "messages": received,
        "after_end": after_end,
        "after_close": after_close,
        "stats": vars(transport.statistics()),
    }


def _contract_process(name: str, spec: GroupSpec, results: Any) -> None:
    async def main() -> dict[str, Any]:
        transport = await open_transport(name, spec)
        return await run_contract_rank(transport)

    try:
        results.put((spec.rank, asyncio.run(main())))
    except BaseException as exc:  # report, so the test names the failure instead of hanging
        results.put((spec.rank, {"error": repr(exc)}))


def run_contract_in_processes(
    name: str,
    world_size: int,
    workdir: Path,
    *,
    timeout_s: float = 120.0,
    address: str | None = None,
) -> dict[int, dict[str, Any]]:
    """Run the contract with each rank in its own process; returns each rank's result.

    ``address`` is the group's rendezvous; by default the transport makes one in ``workdir``.
    """
    from mmsched.transports import transport_class

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    if address is None:
        address = transport_class(name).new_address(workdir)
    procs = [
        ctx.Process(
            target=_contract_process,
            args=(name, GroupSpec(rank, world_size, address, timeout_s=timeout_s), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    try:
        while len(out) < world_size:
            rank, result = results.get(timeout=timeout_s)
            out[rank] = result
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return out


class IterationRecorder:
    """An ``on_iteration`` callback that appends what each rank saw to ``rank<N>.jsonl``.

    Picklable (it holds only a path), so it can be handed to spawned rank processes.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = str(directory)

    def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        from mmsched.inputs import MultimodalInputs

        lines = []
        for req in requests:
            mm = req.mm_inputs
            lines.append(
                {
                    "rid": req.rid,
                    "iteration": iteration,
                    "type": type(mm).__name__,
                    "digest": mm.content_digest() if isinstance(mm, MultimodalInputs) else None,
                    "pad_values": [i.pad_value for i in mm.mm_items]
                    if isinstance(mm, MultimodalInputs)
                    else [],
                }
            )
        if lines:
            with open(Path(self.directory) / f"rank{rank}.jsonl", "a") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")

    def read(self, rank: int) -> list[dict[str, Any]]:
        """What ``rank`` recorded, one dict per request, in the order it saw them."""
        path = Path(self.directory) / f"rank{rank}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


class SlowRank:
    """An ``on_iteration`` callback that makes one rank slow: it sleeps on that rank only."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank = rank
        self.seconds = seconds

    async def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        if rank == self.rank and requests:
            await asyncio.sleep(self.seconds)


class FailingRank:
    """An ``on_iteration`` callback that raises on one rank at its first request, as a
    server's model step might: the rank process dies, and the pipeline reports why."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        if rank == self.rank and requests:
            raise RuntimeError(f"rank {rank} failed in iteration {iteration} (FailingRank)")


# -- faults in the tokenizer's process --------------------------------------------------------


def stop_result_router(pipeline: Pipeline, how: Literal["socket fails", "cancelled"]) -> None:
    """Stop a started pipeline's result router as a fault would, for a test of what every
    waiting and later caller then gets ([`PeerLost`][mmsched.errors.PeerLost], at once).

    Args:
        pipeline: a started pipeline; it cannot serve again afterwards.
        how: ``"socket fails"`` closes the results socket under the router (nothing can
            arrive any more); ``"cancelled"`` cancels the task that runs the pipeline's
            background work (the router, and in-process ranks with it).

    Raises:
        NotRunning: the pipeline is not started.
    """
    # Only a fault reaches these: the pipeline offers no way to stop its router and go on.
    stage, background = pipeline._stage, pipeline._background
    if stage is None or background is None:
        raise NotRunning("the pipeline is not started")
    if how == "socket fails":
        stage._results.close()
    else:
        background.cancel()


# -- the payload-store contract ---------------------------------------------------------------

_SHM = Path("/dev/shm")


def contract_tensors() -> dict[str, torch.Tensor]:
    """What the store contract puts, by label: several dtypes and shapes, an empty tensor,
    one below any store's size threshold, and views that are not contiguous."""
    g = torch.Generator().manual_seed(7)
    return {
        "float32 2-d": torch.randn(256, 130, generator=g),
        "bfloat16 3-d": torch.randn(4, 64, 200, generator=g).to(torch.bfloat16),
        "float16 1-d": torch.randn(40_001, generator=g).to(torch.float16),
        "uint8 odd length": torch.randint(0, 256, (300_001,), dtype=torch.uint8, generator=g),
        "int64": torch.arange(20_000, dtype=torch.int64) * 7 - 3,
        "bool": torch.rand(70_000, generator=g) > 0.5,
        "float64 tiny": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "transposed": torch.randn(300, 200, generator=g).t(),
        "strided rows": torch.randn(900, 64, generator=g)[::3],
    }


def _summary_of(tensor: torch.Tensor) -> list[Any]:
    """dtype, shape and BLAKE3 of a tensor's bytes in row-major order (wherever it lives)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return [
        str(tensor.dtype),
        list(tensor.shape),
        blake3.blake3(flat.numpy().tobytes()).hexdigest(),
    ]


def _forgeries(ref: PayloadRef) -> dict[str, Any]:
    """References a store never made, derived from a real one, as the trees the codec reads."""
    location = list(ref.location)
    tree = ref.to_tree()

    def with_(**changes: Any) -> list[Any]:
        return dataclasses.replace(ref, **changes).to_tree()

    forged = {
        "another store's name": with_(store="no-such-store"),
        "another segment": with_(
            location=tuple("mmsched-0-forged" if isinstance(v, str) else v for v in location)
        ),
        "location cut short": with_(location=tuple(location[:-1])),
        "location too long": with_(location=(*location, 1)),
        "location of strings": with_(location=tuple("x" for _ in location)),
        "offsets past any memory": with_(
            location=tuple(2**62 if isinstance(v, int) else v for v in location)
        ),
        "a path out of the store": with_(
            location=tuple("../../../etc/passwd" if isinstance(v, str) else v for v in location)
        ),
        "shape of other size": with_(shape=(ref.shape[0] + 1, *ref.shape[1:])),
        "dtype of other size": with_(dtype="float64" if ref.dtype != "float64" else "int8"),
        "unknown dtype": with_(dtype="complex999"),
        "not a reference": [tree[0], tree[1]],
        "negative size": [*tree[:2], [-1], *tree[3:]],
    }
    # A location with no ints (or no strings) has nothing to change for some of them.
    return {label: t for label, t in forged.items() if t != tree}


class _Reader:
    """A reader of the store under test: what a rank does with references (module docstring)."""

    def __init__(self, store: PayloadStore) -> None:
        self.store = store
        self.held: dict[str, torch.Tensor] = {}

    def handle(self, command: str, argument: Any) -> Any:
        if command == "resolve":  # {label: tree} -> {label: summary}; held until "drop"
            out = {}
            for label, tree in argument.items():
                tensor = self.store.resolve(PayloadRef.from_tree(tree))
                self.held[label] = tensor
                out[label] = [*_summary_of(tensor), tensor.device.type]
            return out
        if command == "digest":  # what the held tensors hold now
            return {label: _summary_of(t) for label, t in self.held.items()}
        if command == "forward":  # put of what it resolved, and of a tensor of its own
            forwarded = {}
            for label, tensor in self.held.items():
                ref = self.store.put(tensor)
                forwarded[label] = None if ref is None else ref.to_tree()
            own = self.store.put(torch.ones(100_000, dtype=torch.float32))
            return {"forwarded": forwarded, "own": None if own is None else own.to_tree()}
        if command == "forged":  # {label: tree} -> {label: outcome}
            outcomes = {}
            for label, tree in argument.items():
                try:
                    self.store.resolve(PayloadRef.from_tree(tree))
                    outcomes[label] = "resolved"
                except MmschedError as exc:
                    outcomes[label] = f"typed {type(exc).__name__}"
                except Exception as exc:  # the failure the contract is there to catch
                    outcomes[label] = f"untyped {type(exc).__name__}: {exc}"
            return outcomes
        if command == "drop":
            self.held.clear()
            gc.collect()  # a store's room comes back as its tensors are collected
            return None
        if command == "close":
            self.held.clear()
            gc.collect()
            self.store.close()
            return None
        raise ValueError(f"unknown reader command {command!r}")


def _store_reader_process(
    name: str, target: str, address: str | None, index: int, options: StoreOptions, conn: Any
) -> None:
    try:
        if name not in STORES:  # registered at run time in the parent: again here
            STORES.register(name, target)
        reader = _Reader(store_class(name).attach(address, index, options))
    except BaseException as exc:
        conn.send(("error", f"attach: {exc!r}"))
        return
    conn.send(("ok", os.getpid()))
    while True:
        command, argument = conn.recv()
        try:
            conn.send(("ok", reader.handle(command, argument)))
        except BaseException as exc:  # reported: the contract names it instead of hanging
            conn.send(("error", f"{command}: {exc!r}"))
        if command == "close":
            return


class _Readers:
    """Every reader of one contract run: processes of their own, or objects of this one."""

    def __init__(
        self, name: str, address: str | None, options: StoreOptions, apart: bool, timeout_s: float
    ) -> None:
        self._timeout_s = timeout_s
        self._local: list[_Reader] = []
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self.pids: list[int] = []
        if not apart:
            cls = store_class(name)
            self._local = [
                _Reader(cls.attach(address, i, options)) for i in range(options.consumers)
            ]
            return
        ctx = multiprocessing.get_context("spawn")
        target = STORES.target(name)
        for i in range(options.consumers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_store_reader_process,
                args=(name, target, address, i, options, theirs),
                daemon=True,
            )
            proc.start()
            self._conns.append(ours)
            self._procs.append(proc)
        self.pids = [int(pid) for pid in self._answers()]

    def _answers(self) -> list[Any]:
        out = []
        for i, conn in enumerate(self._conns):
            if not conn.poll(self._timeout_s):
                raise AssertionError(f"reader {i} did not answer within {self._timeout_s} s")
            try:
                status, value = conn.recv()
            except EOFError:
                raise AssertionError(f"reader {i} died (its output says why)") from None
            if status != "ok":
                raise AssertionError(f"reader {i} failed: {value}")
            out.append(value)
        return out

    def ask(self, command: str, argument: Any = None, only: int | None = None) -> list[Any]:
        """Every reader's answer to ``command`` (or reader ``only``'s alone)."""
        if self._local:
            readers = self._local if only is None else [self._local[only]]
            return [r.handle(command, argument) for r in readers]
        conns = self._conns if only is None else [self._conns[only]]
        for conn in conns:
            conn.send((command, argument))
        saved, self._conns = self._conns, conns
        try:
            return self._answers()
        finally:
            self._conns = saved

    def close(self) -> None:
        try:
            self.ask("close")
        finally:
            for proc in self._procs:
                proc.join(self._timeout_s)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


@dataclass
class StoreContractResult:
    """What [`run_store_contract`][] found: the checks that passed, failed (with why) and
    were skipped (with why). A store passes when ``failed`` is empty."""

    store: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, why: str = "") -> bool:
        (self.passed if ok else self.failed).append(name if ok else f"{name}: {why}")
        return ok


def _placed(store: PayloadStore, tensor: torch.Tensor) -> tuple[PayloadRef | None, list[Any]]:
    with store.placement() as placement:
        ref = placement.put(tensor)
    return ref, list(placement.placed)


def run_store_contract(
    name: str, *, device: str = "cpu", readers: int = 2, timeout_s: float = 60.0
) -> StoreContractResult:
    """Run the store contract over the store registered as ``name``.

    A writer is made here (``create``) and ``readers`` readers attach (``attach``), each in a
    process of its own where the store's ``shares_across_processes`` says its references
    cross processes, else in this process. What is checked:

    - **roundtrip**: every tensor of [`contract_tensors`][] put through a ``placement``
      either travels inline (``put`` returns ``None``) or comes back from every reader with
      its dtype, shape and bytes, on the store's ``device``; a ``by_reference`` store places
      the large contiguous ones, and one that is not places none;
    - **forwarding**: a reader's ``put`` of a tensor it resolved is ``None`` or the same
      reference, and of a tensor of its own ``None``;
    - **forged references**: references the store never made (another store's name or
      segment, locations cut short, out of range, a path, shapes and dtypes that do not
      match) raise an mmsched error in the reader, never another exception or a crash;
    - **room** (by-reference stores): with ``reject_when_full``, no room means
      [`ArenaFull`][mmsched.errors.ArenaFull] at once; ``settle(sent=False)`` gives room
      back at once; after ``settle`` of what readers still hold, their bytes stay intact
      whatever the writer puts next, and the room comes back once they let go;
    - **lending** (stores that ``lends``): a producer connected through ``lend`` fills a
      tensor that ``claim`` returns with its bytes;
    - **close**: once writer and readers closed, nothing this run made is left in
      ``/dev/shm``.
    """
    cls = store_class(name)
    result = StoreContractResult(name)
    on = torch.device(device) if cls.device == "cuda" else torch.device("cpu")
    tensors = {label: t.to(on) for label, t in contract_tensors().items()}
    capacity = 4 << 20
    options = StoreOptions(
        capacity_bytes=capacity,
        consumers=readers,
        timeout_s=timeout_s,
        min_bytes=4096,
        device=device,
        reject_when_full=True,
    )
    apart = cls.shares_across_processes
    if not apart:
        result.skipped.append("readers in other processes: its references stay in one process")
    workdir = Path(tempfile.mkdtemp(prefix="mmsched-store-contract-"))
    before = {p.name for p in _SHM.glob("mmsched-*")}
    writer = cls.create(options)
    group: _Readers | None = None
    try:
        group = _Readers(name, writer.address, options, apart, timeout_s)
        writer.consumers_attached()
        sections: list[tuple[str, Callable[[], None]]] = [
            ("roundtrip", lambda: _roundtrip(result, writer, group, tensors)),
            ("room", lambda: _room(result, writer, group, on)),
            ("lending", lambda: _lending(result, writer, workdir)),
        ]
        for section, run in sections:
            try:
                run()
            except (MmschedError, AssertionError, OSError, ValueError, TypeError) as exc:
                # A store that breaks a promise by raising fails that section, not the run.
                result.failed.append(f"{section}: raised {type(exc).__name__}: {exc}")
    finally:
        try:
            if group is not None:
                group.close()
        finally:
            writer.close()
            shutil.rmtree(workdir, ignore_errors=True)
    pids = [os.getpid(), *(group.pids if group is not None else [])]
    left = sorted(n for n in _shm_names_of(pids) if n not in before)
    result.check("close leaves nothing in /dev/shm", not left, f"left {left}")
    return result


def _shm_names_of(pids: list[int]) -> set[str]:
    tags = tuple(f"-{pid}-" for pid in pids)
    return {p.name for p in _SHM.glob("mmsched-*") if any(t in f"-{p.name[8:]}" for t in tags)}


def _roundtrip(
    result: StoreContractResult,
    writer: PayloadStore,
    group: _Readers,
    tensors: dict[str, torch.Tensor],
) -> None:
    refs: dict[str, PayloadRef] = {}
    with writer.placement() as placement:
        for label, tensor in tensors.items():
            ref = placement.put(tensor)
            if ref is not None:
                refs[label] = ref
    placed = placement.placed
    big = [label for label, t in tensors.items() if t.is_contiguous() and t.nbytes >= 1 << 16]
    if writer.by_reference:
        missing = [label for label in big if label not in refs]
        result.check("a by-reference store places large tensors", not missing, f"{missing}")
    else:
        result.check("an inline store places nothing", not refs, f"placed {sorted(refs)}")
    expected = {label: _summary_of(tensors[label]) for label in refs}
    answers = group.ask("resolve", {label: ref.to_tree() for label, ref in refs.items()})
    for i, got in enumerate(answers):
        for label, summary in expected.items():
            dtype, shape, digest, where = got[label]
            result.check(
                f"reader {i} gets {label} back",
                [dtype, shape, digest] == summary,
                f"got {dtype} {shape}, bytes {'equal' if digest == summary[2] else 'differ'}",
            )
            result.check(
                f"reader {i} gets {label} on the store's device",
                where == writer.device,
                f"on {where}, the store says {writer.device}",
            )
    forward = group.ask("forward", only=0)[0]
    for label, tree in forward["forwarded"].items():
        result.check(
            f"a reader forwards {label} as the same reference",
            tree is None or tree == refs[label].to_tree(),
            f"{tree} is another reference than {refs[label].to_tree()}",
        )
    result.check(
        "a reader's put of its own tensor travels inline",
        forward["own"] is None,
        f"made {forward['own']}",
    )
    if refs:
        sample = refs.get("float32 2-d") or next(iter(refs.values()))
        outcomes = group.ask("forged", _forgeries(sample))
        for i, got in enumerate(outcomes):
            for label, outcome in got.items():
                result.check(
                    f"reader {i} refuses a forged reference ({label}) with a typed error",
                    outcome.startswith("typed "),
                    outcome,
                )
    else:
        result.skipped.append("forged references: the store makes none")
    group.ask("drop")
    writer.settle(placed)  # every reader is done with them


def _room(
    result: StoreContractResult, writer: PayloadStore, group: _Readers, on: torch.device
) -> None:
    if not writer.by_reference:
        result.skipped.append("room: an inline store holds no bytes")
        return
    chunk = (writer.options.capacity_bytes * 3) // 5

    def filled(value: int) -> torch.Tensor:
        return torch.full((chunk,), value, dtype=torch.uint8, device=on)

    first, held = _placed(writer, filled(1))
    if not result.check(
        "a placement fits in an empty store", first is not None, "travelled inline"
    ):
        writer.settle(held, sent=False)
        return
    try:
        second, more = _placed(writer, filled(2))
        writer.settle(more, sent=False)
        full = f"placed {second}" if second is not None else "travelled inline"
        result.check("no room: ArenaFull at once", False, full)
    except ArenaFull:
        result.passed.append("no room: ArenaFull at once")
    writer.settle(held, sent=False)
    third, held = _placed(writer, filled(3))
    if third is None:
        result.check("settle(sent=False) gives the room back at once", False, "inline")
        writer.settle(held, sent=False)
        return
    result.passed.append("settle(sent=False) gives the room back at once")
    # Sent to every reader, as a transport would; settled while they still hold it.
    seen = group.ask("resolve", {"third": third.to_tree()})
    writer.settle(held)
    try:
        _, others = _placed(writer, filled(4))
        writer.settle(others, sent=False)
    except ArenaFull:
        pass  # the room stays reserved while the readers hold it: right
    now = group.ask("digest")
    result.check(
        "bytes a reader holds stay intact whatever the writer puts next",
        all(n["third"] == s["third"][:3] for n, s in zip(now, seen, strict=True)),
        "they changed under a reader",
    )
    group.ask("drop")
    deadline = time.monotonic() + writer.options.timeout_s
    while True:
        try:
            back, held = _placed(writer, filled(5))
            writer.settle(held, sent=False)
            result.check("room comes back once the readers let go", back is not None, "inline")
            return
        except ArenaFull as exc:
            if time.monotonic() > deadline:
                result.check("room comes back once the readers let go", False, str(exc))
                return
            time.sleep(0.01)


def _lending(result: StoreContractResult, writer: PayloadStore, workdir: Path) -> None:
    if not writer.lends:
        result.skipped.append("lending: the store lends nothing")
        return
    access = writer.lend(workdir / "producers", "contract-token")
    producer = access.connect()
    try:
        tensor, lent = producer.allocate((1000, 3), torch.float32)
        tensor.copy_(torch.arange(3000, dtype=torch.float32).reshape(1000, 3))
        claimed = writer.claim(lent)
        result.check(
            "a lent tensor comes back through claim",
            _summary_of(claimed) == _summary_of(tensor),
            "other bytes",
        )
        del tensor, claimed
    finally:
        producer.close()
