"""``python tests/slow_tokenizer_server.py PORT``: the server of ``mmsched serve`` around a
tokenizer that takes a second to encode and to decode (as a real one might on a long
prompt), the pipeline configured by ``MMSCHED_*`` variables.

The tokenizer sleeps, releasing the GIL as a native tokenizer does, so that a request's
preparation stalls ``/health`` only if it runs on the event loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from mmsched.config import Config
from mmsched.serve import ServeSettings, create_app, run
from mmsched.serve.chat import ByteTokenizer, ChatProcessor

SLOW_S = 1.0
SLOW_MARK = "slowly"
"""Only a text with this word is slow to encode; the chat markup and the rest are not."""


class SlowTokenizer(ByteTokenizer):
    def encode(self, text: str) -> list[int]:
        if SLOW_MARK in text:
            time.sleep(SLOW_S)
        return super().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        text = super().decode(ids)
        if SLOW_MARK in text:
            time.sleep(SLOW_S)
        return text


def main() -> None:
    config = Config.from_env()
    settings = ServeSettings()
    # A processor of its own, given no prompt bound: the server applies the config's.
    processor = ChatProcessor(SlowTokenizer())
    app = create_app(config, settings, processor=processor)
    run(app, host="127.0.0.1", port=int(sys.argv[sys.argv.index("--port") + 1]))


if __name__ == "__main__":
    main()
