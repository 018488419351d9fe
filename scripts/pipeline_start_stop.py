"""How long a ``Pipeline`` takes to start and to close, rank processes included.

For each ``--tp`` (over the ``zmq`` transport, default config otherwise), ``--runs`` times:
the seconds from ``Pipeline.start()`` to every rank ready, and from ``aclose()`` to every
rank process gone. One line of JSON per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from mmsched import Config, Pipeline


async def _measure(tp: int) -> dict[str, float]:
    pipeline = Pipeline(Config(tp_size=tp, transport="zmq"))
    started = time.perf_counter()
    await pipeline.start()
    ready = time.perf_counter()
    await pipeline.aclose()
    closed = time.perf_counter()
    return {"tp": tp, "start_s": ready - started, "close_s": closed - ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", default="2,4", help="comma-separated rank counts")
    parser.add_argument("--runs", type=int, default=3, help="per rank count")
    args = parser.parse_args()
    for tp in (int(x) for x in args.tp.split(",")):
        for _ in range(args.runs):
            record = asyncio.run(_measure(tp))
            print(json.dumps({k: round(v, 3) for k, v in record.items()}))


if __name__ == "__main__":
    main()
