"""An OpenAI-compatible HTTP server around a pipeline: ``mmsched serve``.

- [`mmsched.serve.app`][]: the FastAPI application (chat completions, streaming, models,
  health, metrics) and its settings;
- [`mmsched.serve.chat`][]: messages to input ids and Qwen2-VL-processed images;
- [`mmsched.serve.media`][]: ``data:`` URLs to decoded images, and the request error;
- [`mmsched.serve.metrics`][]: the Prometheus counters.

Needs the ``serve`` extra (``pip install 'mmsched[serve]'``: FastAPI, uvicorn, Pillow,
transformers); the rest of mmsched does not import this package.
"""

from mmsched.serve.app import DEFAULT_MODEL, ServeSettings, create_app

__all__ = ["DEFAULT_MODEL", "ServeSettings", "create_app"]
