"""An OpenAI-compatible HTTP server around a pipeline: ``mmsched serve``.

- [`mmsched.serve.app`][]: the FastAPI application (chat completions, streaming, models,
  health, metrics) and its settings;
- [`mmsched.serve.chat`][]: messages to input ids and Qwen2-VL-processed images;
- [`mmsched.serve.media`][]: ``data:`` URLs to decoded images, and the request error;
- [`mmsched.serve.metrics`][]: the Prometheus counters;
- [`mmsched.serve.options`][]: the request fields honoured, accepted and refused;
- [`mmsched.serve.shutdown`][]: [`run`][mmsched.serve.shutdown.run], serving with a bounded
  stop;
- [`mmsched.serve.apiservers`][] and [`mmsched.serve.frontend`][]: ``--api-servers N``,
  several HTTP processes on one port feeding one engine process.

Needs the ``serve`` extra (``pip install 'mmsched[serve]'``: FastAPI, uvicorn, Pillow,
transformers, prometheus-client); the rest of mmsched does not import this package.
"""

from mmsched.serve.app import DEFAULT_MODEL, ServeSettings, create_app
from mmsched.serve.shutdown import run

__all__ = ["DEFAULT_MODEL", "ServeSettings", "create_app", "run"]
