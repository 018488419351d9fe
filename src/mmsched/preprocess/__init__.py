"""Images decoded and processed where the cores and the GPU are, keyed by their encoded bytes."""

from mmsched.config import PREPROCESS_BACKENDS as BACKENDS
from mmsched.preprocess.keys import content_key, key_hash, processor_identity
from mmsched.preprocess.stage import Preprocessor, PreprocessStats, StageSettings

__all__ = [
    "BACKENDS",
    "PreprocessStats",
    "Preprocessor",
    "StageSettings",
    "content_key",
    "key_hash",
    "processor_identity",
]
