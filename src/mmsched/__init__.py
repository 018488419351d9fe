"""mmsched: carry preprocessed multimodal inputs from the tokenizer to every TP scheduler rank.

Inputs are validated and hashed once ([`MultimodalInputs.from_dict`][]), travel as typed
messages ([`mmsched.codec`][]) over a transport chosen by name ([`mmsched.transports`][]),
their tensor bytes through a payload store chosen by name ([`mmsched.stores`][]), and reach
every rank of a [`Pipeline`][] identical.
"""

import logging

from mmsched.codec import Decoder, decode, encode
from mmsched.config import Config
from mmsched.errors import (
    ArenaFull,
    CodecError,
    ConfigError,
    EndOfStream,
    InvalidMultimodalInput,
    MmschedError,
    ModelOutputError,
    NotRunning,
    Overloaded,
    PeerLost,
    PickleRefused,
    RequestFailed,
    TransportClosed,
    TransportError,
    UnknownNameError,
)
from mmsched.hashing import HashStats, get_hasher, hash_stats
from mmsched.inputs import Modality, MultimodalDataItem, MultimodalInputs, materialize
from mmsched.messages import (
    AbortReq,
    Batch,
    ErrorOutput,
    GenerateOutput,
    TokenizedGenerateReqInput,
)
from mmsched.outputs import ModelOutput
from mmsched.pipeline import Pipeline
from mmsched.probes import ModelStub, Probe, RankTimings
from mmsched.rank_group import Iteration, RankGroup
from mmsched.sglang_items import from_sglang
from mmsched.stores import PayloadRef, PayloadStore, register_store, store_names
from mmsched.strategies import Strategy, get_strategy, register_strategy, strategy_names
from mmsched.tokenizer import RequestTrace
from mmsched.transports import GroupSpec, Transport, open_transport, transport_names

__version__ = "0.1.0"

# Quiet by default: a server that wants mmsched's lifecycle, fault and backpressure records
# configures the "mmsched" logger (or the root logger) itself.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AbortReq",
    "ArenaFull",
    "Batch",
    "CodecError",
    "Config",
    "ConfigError",
    "Decoder",
    "EndOfStream",
    "ErrorOutput",
    "GenerateOutput",
    "GroupSpec",
    "HashStats",
    "InvalidMultimodalInput",
    "Iteration",
    "MmschedError",
    "Modality",
    "ModelOutput",
    "ModelOutputError",
    "ModelStub",
    "MultimodalDataItem",
    "MultimodalInputs",
    "NotRunning",
    "Overloaded",
    "PayloadRef",
    "PayloadStore",
    "PeerLost",
    "PickleRefused",
    "Pipeline",
    "Probe",
    "RankGroup",
    "RankTimings",
    "RequestFailed",
    "RequestTrace",
    "Strategy",
    "TokenizedGenerateReqInput",
    "Transport",
    "TransportClosed",
    "TransportError",
    "UnknownNameError",
    "__version__",
    "decode",
    "encode",
    "from_sglang",
    "get_hasher",
    "get_strategy",
    "hash_stats",
    "materialize",
    "open_transport",
    "register_store",
    "register_strategy",
    "store_names",
    "strategy_names",
    "transport_names",
]
