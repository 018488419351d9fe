"""Property-based fuzzing of every boundary where foreign data enters (``pytest -m faults``).

Three boundaries, 2,000 generated inputs each, derandomized so that CI runs the same cases
every time:

- processor output: mutated processor dicts go through a real TP=2 pipeline whose ranks
  build the inputs (``per-rank``, ranks as tasks over the ``memory`` transport, behind the
  real request and result sockets: the tokenizer's codec and the ranks' ``from_dict`` both
  see them);
- frames: generated frame lists go to the decoder, and to the live pipeline's result socket
  as a member of the run would send them;
- store references: generated arena refs go to a shared-memory reader, and generated
  payload references to a decoder whose ``shm`` store must resolve them or refuse them.

Every outcome must be a value or an mmsched error; after each run the pipeline serves a good
request identically on every rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from malformed import base_sample
from mmsched import (
    CodecError,
    Config,
    Decoder,
    GenerateOutput,
    MmschedError,
    MultimodalInputs,
    Pipeline,
    RankTimings,
    TransportError,
    decode,
)
from mmsched.credentials import present_credentials
from mmsched.stores import StoreOptions
from mmsched.stores.arena import ArenaReader, Ref
from mmsched.stores.shm import ShmStore

pytestmark = pytest.mark.faults

EXAMPLES = 2000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
INPUT_LEN = 200
_T = TypeVar("_T")


# -- a pipeline on its own event loop, for sync Hypothesis tests ---------------------------


class LivePipeline:
    """A started pipeline whose event loop runs in a thread; ``run`` awaits on it."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pipeline = Pipeline(config, probe=RankTimings(digest_prefix=""))
        self.run(self.pipeline.start(), timeout=120)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.pipeline.aclose(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def serves_a_good_request_identically(self, rid: str) -> None:
        good = base_sample()
        ids = good.input_ids + [0] * (INPUT_LEN - len(good.input_ids))
        expected = MultimodalInputs.from_dict(good.mm_inputs, hasher="sha256").content_digest()
        trace = self.run(self.pipeline.generate_traced(rid, ids, good.mm_inputs))
        assert {r.data["content_digest"] for r in trace.reports} == {expected}


@pytest.fixture(scope="module")
def live() -> Iterator[LivePipeline]:
    config = Config(
        strategy="per-rank",
        transport="memory",  # ranks as tasks: every rank builds, over real sockets
        tp_size=2,
        hasher="sha256",
        timeout_s=30,
        idle_wait_ms=1,
        max_request_bytes=1 << 20,
    )
    running = LivePipeline(config)
    yield running
    running.close()


# -- generated values ----------------------------------------------------------------------

_DTYPES = ["<f4", ">f4", "<f2", "<f8", "|u1", "<i8", ">i4", "<c8", "|b1", "<M8[s]"]


@st.composite
def arrays(draw: st.DrawFn) -> Any:
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    array = np.zeros(shape, dtype=dtype)
    if draw(st.booleans()) and array.ndim:
        array = array[::-1]
    if draw(st.booleans()) and array.dtype.kind != "M":  # torch has no datetime
        return torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("=")))
    return array


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=8),
    st.binary(max_size=8),
)
VALUES = st.recursive(
    st.one_of(_SCALARS, arrays()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)

_TOP_KEYS = ["mm_items", "mrope_positions", "mrope_position_delta", "im_token_id", "extra"]
_ITEM_KEYS = ["modality", "feature", "offsets", "image_grid_thw", "video_grid_thw", "note"]


@st.composite
def processor_outputs(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = base_sample().mm_inputs
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            raw[draw(st.sampled_from(_TOP_KEYS))] = draw(VALUES)
        elif isinstance(raw.get("mm_items"), list) and raw["mm_items"]:
            item = raw["mm_items"][0]
            if isinstance(item, dict):
                item[draw(st.sampled_from(_ITEM_KEYS))] = draw(VALUES)
    return raw


# -- 1. processor output through a real pipeline ------------------------------------------


def test_fuzzed_processor_output_is_a_value_or_an_mmsched_error(live: LivePipeline) -> None:
    count = 0

    @FUZZ
    @given(processor_outputs())
    def one(raw: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        ids = base_sample().input_ids
        ids = ids + [0] * (INPUT_LEN - len(ids))
        try:
            output = live.run(live.pipeline.generate(f"fuzz-{count}", ids, raw))
        except MmschedError:
            return
        assert isinstance(output, GenerateOutput)

    one()
    assert count >= EXAMPLES
    live.serves_a_good_request_identically("after-processor-fuzz")


# -- 2. frames: the decoder, and the live result socket ------------------------------------

_TREE = st.recursive(
    st.one_of(
        st.none(),
        st.integers(-(2**63), 2**64 - 1),  # what JSON headers can hold
        st.text(max_size=6),
        st.sampled_from(["output", "error", "rank_progress", "rank_ready", "generate", "$t"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "$t",
                    "$tensor",
                    "$ndarray",
                    "$ints",
                    "$bytes",
                    "$tuple",
                    "$dict",
                    "$float",
                    "$pickle",
                    "rid",
                    "dtype",
                    "shape",
                    "output_ids",
                    "rank",
                    "iteration",
                    "v",
                    "n",
                ]
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=12,
)


@st.composite
def frame_lists(draw: st.DrawFn) -> list[bytes]:
    buffers = draw(st.lists(st.binary(max_size=64), max_size=3))
    if draw(st.booleans()):
        header = {"v": 1, "n": len(buffers), "msg": draw(_TREE)}
        first = orjson.dumps(header, option=orjson.OPT_NON_STR_KEYS)
    else:
        first = draw(st.binary(max_size=64))
    return [first, *buffers]


def test_fuzzed_frames_decode_to_a_message_or_codec_error(live: LivePipeline) -> None:
    addresses = live.pipeline.rank_addresses
    assert addresses is not None and live.pipeline.running
    ctx = zmq.Context()
    rank_like = ctx.socket(zmq.PUSH)
    rank_like.setsockopt(zmq.LINGER, 0)
    present_credentials(rank_like, addresses.token)
    rank_like.connect(addresses.results)
    count = 0
    try:

        @FUZZ
        @given(frame_lists())
        def one(frames: list[bytes]) -> None:
            nonlocal count
            count += 1
            with contextlib.suppress(CodecError):
                decode(frames)
            rank_like.send_multipart(frames)

        one()
        assert count >= EXAMPLES
        live.serves_a_good_request_identically("after-frame-fuzz")
    finally:
        ctx.destroy(linger=0)


# -- 3. store references -----------------------------------------------------------------


def test_fuzzed_refs_give_a_payload_view_or_transport_error() -> None:
    options = StoreOptions(capacity_bytes=1 << 20, consumers=1, timeout_s=0.1)
    producer = ShmStore.create(options)
    arena = producer._writer
    assert arena is not None and producer.address is not None
    reader = ArenaReader(producer.address, 0)
    consumer = ShmStore.attach(producer.address, 0, options)
    decoder = Decoder(store=consumer)
    data_start, size = 4096, 4096 + arena.capacity
    count = 0
    try:
        ints = st.one_of(st.integers(-(2**63), 2**63), st.booleans(), st.floats(), st.none())
        names = st.sampled_from([producer.address, "x", "shm", "uint8", "cpu"])

        @FUZZ
        @given(
            st.one_of(
                st.builds(Ref, st.sampled_from([producer.address, "x"]), ints, ints, ints),
                # payload references as a message carries them: the store's name, a dtype, a
                # shape, a device, a location, each well-formed or not
                st.lists(
                    st.one_of(names, ints, st.lists(st.one_of(ints, names), max_size=5)),
                    max_size=6,
                ),
            )
        )
        def one(value: Any) -> None:
            nonlocal count
            count += 1
            if isinstance(value, Ref):
                try:
                    view = reader.view(value)
                except TransportError:
                    return
                assert data_start <= value.offset and value.offset + len(view) <= size
                assert len(view) == value.nbytes
                return
            tree = {"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$ref": value}}}
            with contextlib.suppress(CodecError):
                decoder.decode([orjson.dumps(tree)])

        one()
        assert count >= EXAMPLES
    finally:
        reader.close()
        consumer.close()
        producer.close()
