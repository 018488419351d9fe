"""The codec: bitwise round trips, tensors out of band, pickle only when allowed."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from mmsched import (
    AbortReq,
    Batch,
    CodecError,
    Decoder,
    ErrorOutput,
    GenerateOutput,
    MultimodalInputs,
    PickleRefused,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from mmsched.bench.workloads import audio_sample, image_sample, qwen2vl_image, video_sample
from mmsched.codec import encoded_size
from mmsched.frames import Int64List
from mmsched.hashing import tensor_bytes
from mmsched.inputs import validate_input_ids
from mmsched.messages import MaterializedInputs, ProbeReport, RankReady, Shutdown


def assert_same_inputs(a: MultimodalInputs, b: MultimodalInputs) -> None:
    assert a.fingerprint() == b.fingerprint()
    assert a.special_token_ids == b.special_token_ids
    for x, y in zip(a.mm_items, b.mm_items, strict=True):
        assert x.feature.dtype == y.feature.dtype and x.feature.shape == y.feature.shape
        assert bytes(tensor_bytes(x.feature)) == bytes(tensor_bytes(y.feature))
        assert x.model_specific_data.keys() == y.model_specific_data.keys()
    assert a.content_digest() == b.content_digest()


@pytest.mark.parametrize(
    "sample",
    [image_sample(4, 6), video_sample(frames=4, grid_h=2, grid_w=4), audio_sample(2, 0.5)],
    ids=["image", "video", "audio"],
)
def test_materialized_request_round_trips_bitwise(sample) -> None:  # type: ignore[no-untyped-def]
    mm = MultimodalInputs.from_dict(sample.mm_inputs)
    req = TokenizedGenerateReqInput("r1", sample.input_ids, {"max_new_tokens": 8}, mm)
    back = decode(encode(req))
    assert isinstance(back, TokenizedGenerateReqInput)
    assert (back.rid, back.input_ids, back.sampling_params) == (
        "r1",
        sample.input_ids,
        {"max_new_tokens": 8},
    )
    assert isinstance(back.mm_inputs, MultimodalInputs)
    assert_same_inputs(mm, back.mm_inputs)


def test_bf16_and_special_values_survive() -> None:
    t = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, 3.0]).to(torch.bfloat16)
    raw = {"mm_items": [{"modality": "image", "feature": t.reshape(1, 5), "offsets": [(0, 0)]}]}
    mm = MultimodalInputs.from_dict(raw)
    back = decode(encode(TokenizedGenerateReqInput("r", [0], mm_inputs=mm)))
    assert isinstance(back, TokenizedGenerateReqInput) and isinstance(
        back.mm_inputs, MultimodalInputs
    )
    got = back.mm_inputs.mm_items[0].feature
    assert got.dtype == torch.bfloat16
    assert bytes(tensor_bytes(got)) == bytes(tensor_bytes(t))


def test_raw_dict_round_trips_with_tensors_out_of_band() -> None:
    sample = image_sample(2, 4)
    frames = encode(TokenizedGenerateReqInput("r", sample.input_ids, mm_inputs=sample.mm_inputs))
    feature = sample.mm_inputs["mm_items"][0]["feature"]
    # The feature travels as its own frame, and that frame is the tensor's memory: no copy.
    big = [f for f in frames[1:] if memoryview(f).nbytes == feature.numel() * 4]
    assert len(big) == 1
    assert np.frombuffer(big[0], dtype=np.uint8).ctypes.data == feature.data_ptr()
    assert memoryview(frames[0]).nbytes < 2000  # the header stays small
    back = decode(frames)
    assert isinstance(back, TokenizedGenerateReqInput) and isinstance(back.mm_inputs, dict)
    assert torch.equal(back.mm_inputs["mm_items"][0]["feature"], feature)
    assert back.mm_inputs["mm_items"][0]["offsets"] == [(16, 17)]


def test_plain_values_keep_their_types() -> None:
    extra = {
        "tuple": (1, 2.5, "x", None, True),
        "bytes": b"\x00\x01",
        "ndarray": np.arange(6, dtype=np.int16).reshape(2, 3),
        "$reserved": {"nested": [1, {"$t": "fake"}]},
        3: "int key",
    }
    back = decode(encode(TokenizedGenerateReqInput("r", [], sampling_params=extra)))
    assert isinstance(back, TokenizedGenerateReqInput)
    got = back.sampling_params
    assert got["tuple"] == (1, 2.5, "x", None, True)
    assert got["bytes"] == b"\x00\x01"
    assert np.array_equal(got["ndarray"], extra["ndarray"]) and got["ndarray"].dtype == np.int16
    assert got["$reserved"] == {"nested": [1, {"$t": "fake"}]}
    assert got[3] == "int key"


def test_numpy_scalars_keep_their_type_and_need_no_pickle() -> None:
    values = [np.int64(-3), np.int32(7), np.uint8(255), np.bool_(True), np.float32(0.5)]
    values.append(np.complex64(1 + 2j))
    mm = {"mm_items": [{"modality": "image", "offsets": [(np.int64(1), np.int64(3))]}]}
    req = TokenizedGenerateReqInput("r", [], sampling_params={"v": values}, mm_inputs=mm)
    back = decode(encode(req, allow_pickle=False))  # no pickle on either side
    assert isinstance(back, TokenizedGenerateReqInput)
    for sent, got in zip(values, back.sampling_params["v"], strict=True):
        assert type(got) is type(sent) and got == sent
    assert back.mm_inputs == {"mm_items": [{"modality": "image", "offsets": [(1, 3)]}]}
    (start, end) = back.mm_inputs["mm_items"][0]["offsets"][0]
    assert type(start) is np.int64 and type(end) is np.int64


@pytest.mark.parametrize(
    "message",
    [
        AbortReq("a"),
        Shutdown(),
        Batch(3, [TokenizedGenerateReqInput("x", [1, 2])], ["y"], shutdown=True),
        MaterializedInputs("m", error=ErrorOutput("m", "InvalidMultimodalInput", "bad", "f")),
        GenerateOutput("o", [1, 2, 3], "length", [7]),
        ErrorOutput("e", "RuntimeError", "boom"),
        ProbeReport("r", 1, {"ready_at": 3.5, "digest": None, "count": 4}),
        RankReady(0, 1234),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_kind_round_trips(message) -> None:  # type: ignore[no-untyped-def]
    back = decode(encode(message))
    assert type(back) is type(message)
    assert repr(back) == repr(message)


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


def test_opaque_values_are_pickled_and_refused_by_default() -> None:
    frames = encode(TokenizedGenerateReqInput("r", [], sampling_params={"thing": Opaque(5)}))
    with pytest.raises(PickleRefused, match="allow_pickle"):
        decode(frames)
    back = decode(frames, allow_pickle=True)
    assert isinstance(back, TokenizedGenerateReqInput)
    assert back.sampling_params["thing"].value == 5


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        ([], "no frames"),
        ([b"not json"], "not JSON"),
        ([b'{"v": 99, "n": 0, "msg": null}'], "unsupported header"),
        ([b'{"v": 1, "n": 2, "msg": null}'], "announces 2 buffers"),
        ([b'{"v": 1, "n": 0, "msg": {"$t": "nope"}}'], "unknown message kind"),
        ([b'{"v": 1, "n": 0, "msg": {"$t": "abort"}}'], "bad fields"),
        ([b'{"v": 1, "n": 0, "msg": 5}'], "not a message"),
        (
            [
                b'{"v": 1, "n": 1, "msg": {"$t": "abort", "rid": {"$tensor": 0, "dtype": "float32",'
                b' "shape": [4]}}}',
                b"123",
            ],
            "need 16",
        ),
        (
            [
                b'{"v": 1, "n": 1, "msg": {"$t": "abort", "rid": {"$tensor": 0, "dtype": "float32",'
                b' "shape": "x"}}}',
                b"123",
            ],
            "malformed",
        ),
        ([b'{"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$bytes": 3}}}'], "out of range"),
        # Found by an adversarial review: each used to raise something other than CodecError.
        (
            [
                b'{"v": 1, "n": 1, "msg": {"$t": "abort", "rid": {"$tensor": 0, "dtype": "int64",'
                b' "shape": [-1, 0]}}}',
                b"",
            ],
            "malformed shape",
        ),
        (
            [
                b'{"v": 1, "n": 1, "msg": {"$t": "abort", "rid": {"$tensor": 0, "dtype": "float32",'
                b' "shape": [4611686018427387905, 4]}}}',
                b"\0" * 16,
            ],
            "need 73786976294838206480",
        ),
        (
            [
                b'{"v": 1, "n": 1, "msg": {"$t": "abort", "rid": {"$ndarray": 0, "dtype": "<f4",'
                b' "shape": [-1]}}}',
                b"\0" * 16,
            ],
            "malformed shape",
        ),
        (
            [
                b'{"v": 1, "n": 1, "msg": {"$t": "abort", "rid": {"$ndarray": 0, "dtype": "O",'
                b' "shape": [2]}}}',
                b"\0" * 16,
            ],
            "Python objects",
        ),
        ([b'{"v": 1, "n": 0, "msg": ' + b"[" * 900 + b"]" * 900 + b"}"], "malformed message"),
        ([b'{"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$dict": 5}}}'], "malformed message"),
        (
            [b'{"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$npscalar": "<i8", "hex": "00"}}}'],
            "bad numpy scalar",
        ),
        (
            [b'{"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$npscalar": "O", "hex": ""}}}'],
            "bad numpy scalar",
        ),
        ([b'{"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$npscalar": "zz"}}}'], "malformed"),
    ],
)
def test_corrupt_frames_raise_codec_error(frames: list[bytes], problem: str) -> None:
    with pytest.raises(CodecError, match=problem):
        decode(frames)


def test_encode_refuses_what_it_cannot_carry() -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    for value in (2**70, "\ud800", cyclic):
        with pytest.raises(CodecError, match="cannot encode"):
            encode(ErrorOutput(rid="r", kind="k", message="m", field=value))  # type: ignore[arg-type]


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(CodecError, match="not a message"):
        encode(MultimodalInputs([]))  # type: ignore[arg-type]


def test_built_object_costs_under_5_percent_over_the_raw_dict() -> None:
    # The request's caution: the materialized object may be a little larger (it carries the
    # hashes); the difference must stay under 5%.
    sample = qwen2vl_image()
    mm = MultimodalInputs.from_dict(sample.mm_inputs)
    as_dict = encoded_size(
        encode(TokenizedGenerateReqInput("r", sample.input_ids, mm_inputs=sample.mm_inputs))
    )
    as_obj = encoded_size(encode(TokenizedGenerateReqInput("r", sample.input_ids, mm_inputs=mm)))
    assert as_obj >= as_dict
    assert (as_obj - as_dict) / as_dict < 0.05
    # The same holds for pickle, the format SGLang's broadcast_pyobj uses.
    p_dict = len(pickle.dumps(sample.mm_inputs))
    p_obj = len(pickle.dumps(mm))
    assert (p_obj - p_dict) / p_dict < 0.05


def test_long_int_lists_travel_as_one_frame() -> None:
    ids = list(range(-5, 5000))
    frames = encode(TokenizedGenerateReqInput("r", ids, sampling_params={"short": [1, 2, 3]}))
    assert memoryview(frames[0]).nbytes < 300  # header holds no token ids
    assert [memoryview(f).nbytes for f in frames[1:]] == [len(ids) * 8]
    back = decode(frames)
    assert isinstance(back, TokenizedGenerateReqInput)
    assert back.input_ids == ids and type(back.input_ids[0]) is int
    assert back.sampling_params["short"] == [1, 2, 3]
    mixed = [1] * 100 + [True]  # bools are not ids: the list stays JSON, types intact
    again = decode(encode(TokenizedGenerateReqInput("r", [], sampling_params={"m": mixed})))
    assert isinstance(again, TokenizedGenerateReqInput)
    assert again.sampling_params["m"][-1] is True


def test_forwarded_ids_reuse_their_frame_until_changed() -> None:
    ids = list(range(5000))
    received = decode(encode(TokenizedGenerateReqInput("r", ids)))
    assert isinstance(received, TokenizedGenerateReqInput)
    assert received.input_ids == ids and isinstance(received.input_ids, Int64List)
    # The entry rank forwards the request: the ids' frame goes out again as it came.
    frame = received.input_ids.frame
    forwarded = encode(received)
    assert any(f is frame for f in forwarded)
    # A change forgets the frame: the new ids are encoded, not the stale frame.
    received.input_ids[0] = 7
    received.input_ids.append(9)
    again = decode(encode(received))
    assert isinstance(again, TokenizedGenerateReqInput)
    assert again.input_ids == [7, *range(1, 5000), 9]
    # Copies and pickles are plain lists (a frame does not pickle).
    assert type(pickle.loads(pickle.dumps(again.input_ids))) is list


def test_ids_that_are_not_all_ints_do_not_go_as_a_frame() -> None:
    for ids in ([True] * 100, [1.0] * 100, [2**63] * 100):
        frames = encode(TokenizedGenerateReqInput("r", ids))
        assert b"$ints" not in bytes(frames[0])
        assert decode(frames).input_ids == ids  # type: ignore[union-attr]


def test_peek_rid_names_an_undecodable_request() -> None:
    frames = encode(TokenizedGenerateReqInput("r-9", [], sampling_params={"x": Opaque(1)}))
    with pytest.raises(PickleRefused):
        decode(frames)
    assert Decoder.peek_rid(frames) == "r-9"
    assert Decoder.peek_rid([b"garbage"]) is None
    assert Decoder.peek_rid(encode(Shutdown())) is None


def test_validated_ids_travel_in_the_array_made_to_check_them() -> None:
    ids = validate_input_ids(np.arange(100).tolist())
    assert isinstance(ids, Int64List) and ids == list(range(100))
    assert any(f is ids.frame for f in encode(TokenizedGenerateReqInput("r", ids)))


def test_a_sender_that_may_not_pickle_is_refused_before_anything_goes() -> None:
    from mmsched import PickleRefused, TokenizedGenerateReqInput

    odd = TokenizedGenerateReqInput("r", [1], {"stop": {1, 2}}, None)  # a set: pickled
    with pytest.raises(PickleRefused, match="allow_pickle"):
        encode(odd, allow_pickle=False)
    assert len(encode(odd)) == 2  # allowed by default: the header and the pickle frame
    plain = TokenizedGenerateReqInput("r", [1], {"stop": ["\n"]}, None)
    assert len(encode(plain, allow_pickle=False)) == 1


@pytest.mark.parametrize("hasher", ["blake3", "sglang-0.5.23"])
def test_wide_pad_values_and_padded_ids_survive_as_int64(hasher: str) -> None:
    # Pad values take up to 63 bits (62 plus the shift): the items' values, and the padded
    # ids a rank sends back, must cross the codec unchanged, ids in one int64 frame.
    sample = image_sample(4, 6)
    mm = MultimodalInputs.from_dict(sample.mm_inputs, hasher=hasher)
    assert max(mm.mm_items[0].pad_values) >= 2**31
    back = decode(encode(TokenizedGenerateReqInput("r1", sample.input_ids, {}, mm)))
    assert isinstance(back, TokenizedGenerateReqInput)
    assert isinstance(back.mm_inputs, MultimodalInputs)
    assert back.mm_inputs.mm_items[0].pad_values == mm.mm_items[0].pad_values
    assert back.mm_inputs.fingerprint() == mm.fingerprint()
    padded = mm.pad_input_ids([*sample.input_ids, *range(1000)])  # long: one int64 frame
    frames = encode(GenerateOutput("r1", padded, pad_values=[mm.mm_items[0].pad_value]))
    assert len(padded) * 8 in [memoryview(f).nbytes for f in frames[1:]]
    out = decode(frames)
    assert isinstance(out, GenerateOutput)
    assert out.output_ids == padded and out.pad_values == [mm.mm_items[0].pad_value]
