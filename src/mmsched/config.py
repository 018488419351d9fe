"""Pipeline configuration: from keyword arguments, a dict, a TOML file or the environment.

Every field can be set in each of these ways; later sources override earlier ones, so a
deployment can keep a TOML file and override one value with an environment variable:

```python
config = Config.from_toml("mmsched.toml").with_env()
```

Environment variables are ``MMSCHED_`` plus the field name in upper case, e.g.
``MMSCHED_TRANSPORT=torch``, ``MMSCHED_STRATEGY=tokenizer``, ``MMSCHED_TP_SIZE=4``. Any other
``MMSCHED_*`` variable is an error (a misspelt one would otherwise be silently ignored),
except the set-up scripts' ``MMSCHED_TORCH`` and ``MMSCHED_EXTRAS``.

Every error names where the bad value came from (the variable, or the file and line) and,
for an unknown name, the nearest known one.

A strategy *preset* stands for several values: ``strategy="zero-copy"`` gives
``strategy="tokenizer"`` and ``payload_store="shm"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsched.devices import check_device_setting
from mmsched.errors import ConfigError
from mmsched.hashing import DEFAULT_HASHER, get_hasher
from mmsched.pixels import WIRE_FORMATS
from mmsched.processes import START_METHODS
from mmsched.stores import store_class
from mmsched.strategies import PRESETS, get_strategy
from mmsched.transports import TransportOptions, transport_class

ENV_PREFIX = "MMSCHED_"
SCRIPT_VARIABLES = frozenset({"MMSCHED_TORCH", "MMSCHED_EXTRAS"})
"""``MMSCHED_*`` variables of the set-up scripts (``scripts/setup.sh``), not config fields."""
CACHE_HASHERS = ("blake3", "sha256", "sglang-0.5.23", "sglang-0.5")
"""Hashers that may key the feature cache (collision-resistant)."""


PREPROCESS_BACKENDS = ("auto", "cpu", "threads", "cuda")
"""Where ``mmsched serve`` decodes and processes images (``preprocess_backend``)."""

SHM_TRANSPORT_DEFAULT_MB = 256
"""The ``shm`` transport's arena over a store that carries the bytes: headers and token ids
(kilobytes to a few MB a request), and the tensors a full store sends inline rather than
wait (``stores/shm.py``): room for many iterations in flight, a quarter of the store's."""


@dataclass(frozen=True)
class Config:
    """What a pipeline runs with. Names are resolved (and checked) when the config is made.

    Attributes:
        transport: how the entry rank fans out to the other ranks (``zmq``, ``shm``,
            ``torch``; ``memory`` runs every rank as a task of the caller's process).
            The defaults (``tokenizer`` strategy, ``shm`` store, ``zmq``) are what
            [Choosing a transport](../transports.md) recommends for ranks on one host.
        strategy: where inputs are materialized (``per-rank``, ``entry-broadcast``,
            ``tokenizer``), or the preset ``zero-copy`` (``tokenizer`` + ``shm`` store).
        payload_store: where tensor bytes live on their way to the ranks: ``inline`` (in
            the messages' frames) or ``shm`` (written once into shared memory every rank
            maps; only references travel).
        requests_address: where the tokenizer sends requests to the entry rank: ``None``
            for an ``ipc://`` endpoint in the run's private directory, or
            ``tcp://HOST:PORT`` (``PORT`` may be ``*``: any free port).
        results_address: where the ranks send results to the tokenizer; as above.
        hasher: content hash of features (``blake3``, ``sha256``, ``sglang-0.5.23``, ``xxh3``;
            ``sglang-0.5`` is a deprecated alias of ``sglang-0.5.23``).
        tp_size: number of scheduler ranks.
        idle_wait_ms: how long the entry rank waits for a first request before announcing an
            empty iteration (the other ranks' heartbeat).
        timeout_s: longest wait for a peer in any blocking step before it counts as lost.
        startup_timeout_s: longest wait for every rank to join at start.
        rank_start_method: how rank processes start: ``forkserver`` (the default where the
            platform has it: one server process, with torch and the rank's code imported
            once, forks each rank in milliseconds) or ``spawn`` (each rank a fresh
            interpreter that imports torch again: 2-3 s of CPU a rank). Under both a rank
            imports the program's main module again and sees the environment of the
            process that started it ([`mmsched.processes`][]).
        max_request_bytes: largest total feature size of one request; ``None``: no limit.
        allow_pickle: let the codec unpickle opaque values (trust every sender first).
        tokenizer_workers: threads that materialize inputs in the tokenizer (a request with
            features under ``mmsched.tokenizer.INLINE_MAX_BYTES``, or under
            ``IDLE_INLINE_MAX_BYTES`` with no other request in flight, is prepared on the
            loop).
        shm_arena_mb: size of the ``shm`` (and ``pinned``) payload store's shared-memory
            arena, where tensor bytes travel; reserved and faulted in at start.
        shm_transport_mb: size of the ``shm`` transport's own arena, which carries frames.
            ``None`` (the default) sizes it for what travels there: ``shm_arena_mb`` under
            the ``inline`` payload store (tensor bytes ride in the frames), else
            ``SHM_TRANSPORT_DEFAULT_MB`` (256: headers, token ids, and what a full store
            sends inline), so that a host does not hold two arenas of ``shm_arena_mb``.
        max_inflight_mb: most feature bytes of requests sent and not yet answered; a slow
            rank then holds back the tokenizer instead of growing queues. ``None``: no bound.
        backpressure: at that bound, ``wait`` (up to ``backpressure_wait_s``) or ``reject``;
            both end in [`Overloaded`][mmsched.errors.Overloaded] for the request that cannot go.
        backpressure_wait_s: how long ``wait`` waits for room.
        device: where each rank's callback receives the features: ``cpu`` (host tensors),
            ``cuda`` (rank ``r`` gets ``cuda:{r % device_count}``), ``cuda:N`` (every rank on
            GPU ``N``) or a comma-separated list with one device per rank. On a GPU, tensors
            arrive copied and ready (their copy finished) when the callback runs.
        cuda_pool_mb: size of the GPU pool of the ``cuda-ipc`` payload store, allocated on
            rank 0's device at start.
        feature_cache_mb: bytes of features each rank keeps, by content hash, so that a
            repeated feature travels as a reference (``0``: no cache). Needs a strategy that
            hashes in the tokenizer and a collision-resistant hasher (``blake3``, ``sha256``).
        nnodes: number of hosts the ``tp_size`` ranks are spread over, ``tp_size / nnodes``
            on each (see [Several hosts](../hosts.md)). The process that runs the pipeline
            is node 0; every other host runs ``mmsched rank --node-rank K``.
        dist_init_addr: ``HOST:PORT`` of node 0 where the other hosts join (``nnodes > 1``
            only). Node 0 listens on ``PORT`` (joining), ``PORT+1`` (results) and
            ``PORT+2`` (the iterations, payloads included, once per host) at ``HOST``.
        max_prompt_tokens: longest prompt ``mmsched serve`` accepts, in tokens (its input
            ids: text, chat markup and every image's pad tokens); a longer one is an HTTP 400
            naming this bound. ``None``: no bound but the body's size. ``Pipeline.generate``
            itself does not apply it.
        shutdown_timeout_s: how long ``mmsched serve``, told to stop (SIGTERM, SIGINT), lets
            the requests in progress finish; those still running then are answered HTTP 503,
            and the pipeline closes.
        wire_pixels: what ``mmsched serve`` sends the ranks for each image: ``uint8`` (the
            default: it measured faster end to end), the processor's resized pixels, an
            eighth of the bytes, which each rank's model normalizes and patchifies on its
            own device ([`mmsched.pixels`][mmsched.pixels]); or ``float32``, the image
            processor's ``pixel_values``. ``Pipeline.generate`` carries either, as the
            items say.
        preprocess_backend: where ``mmsched serve`` decodes and processes images: ``cpu``
            (a pool of worker processes, each on one core, running the processor's
            torchvision backend and writing into the payload store), ``threads`` (Pillow on
            threads of the server's process), ``cuda`` (decoded and processed on
            ``preprocess_device`` in micro-batches), or ``auto``: ``cpu`` where torchvision
            imports, else ``threads``. See [The server](../serving.md#preprocessing).
        preprocess_workers: processes of the ``cpu`` pool; ``None``: the cores left after
            the server's process, its HTTP processes (``api_servers`` above 1) and this
            host's ranks, at least 1.
        preprocess_device: the GPU of the ``cuda`` backend.
        preprocess_gpu_mb: most GPU memory the ``cuda`` backend holds for images in work
            (decoded pixels, features); an image past it is answered HTTP 503.
        preprocess_batch_ms: longest an image waits for others to share its GPU batch.
        preprocess_batch_images: most images in one GPU batch.
        preprocess_cache_mb: bytes of processed features ``mmsched serve`` keeps by content
            key (the image's encoded bytes and the processor), so that a repeated image is
            neither decoded nor processed again; ``0``: no cache.
        api_servers: HTTP processes of ``mmsched serve``, sharing its port: each reads,
            parses and checks requests (base64 decoded, images keyed) and hands them to the
            one engine process (the preprocessing stage and the pipeline) over a local
            socket. ``1``: one process does everything, as without the option. See
            [Several HTTP processes](../serving.md#several-http-processes).
    """

    transport: str = "zmq"
    strategy: str = "tokenizer"
    payload_store: str = "shm"
    requests_address: str | None = None
    results_address: str | None = None
    hasher: str = DEFAULT_HASHER
    tp_size: int = 1
    idle_wait_ms: float = 20.0
    timeout_s: float = 60.0
    startup_timeout_s: float = 120.0
    rank_start_method: str = "forkserver"
    max_request_bytes: int | None = None
    allow_pickle: bool = False
    tokenizer_workers: int = 8
    shm_arena_mb: int = 1024
    shm_transport_mb: int | None = None
    max_inflight_mb: int | None = 1024
    backpressure: str = "wait"
    backpressure_wait_s: float = 30.0
    device: str = "cpu"
    cuda_pool_mb: int = 1024
    feature_cache_mb: int = 0
    nnodes: int = 1
    dist_init_addr: str | None = None
    max_prompt_tokens: int | None = 32768
    shutdown_timeout_s: float = 5.0
    wire_pixels: str = "uint8"
    preprocess_backend: str = "auto"
    preprocess_workers: int | None = None
    preprocess_device: str = "cuda:0"
    preprocess_gpu_mb: int = 2048
    preprocess_batch_ms: float = 2.0
    preprocess_batch_images: int = 32
    preprocess_cache_mb: int = 1024
    api_servers: int = 1

    def __post_init__(self) -> None:
        for key, value in PRESETS.get(self.strategy, {}).items():
            object.__setattr__(self, key, value)  # frozen: a preset is resolved once, here
        transport = transport_class(self.transport)
        get_strategy(self.strategy)
        store = store_class(self.payload_store)
        check_device_setting(self.device, self.tp_size)
        if store.device == "cuda" and self.device == "cpu":
            raise ConfigError(
                f"the {self.payload_store!r} payload store delivers on a GPU: set device "
                "(e.g. device='cuda')"
            )
        if store.by_reference and not store.shares_across_processes and transport.cross_process:
            raise ConfigError(
                f"the {self.payload_store!r} payload store's references resolve only in the "
                f"tokenizer's process, and the {self.transport!r} transport puts ranks in "
                "processes of their own: use the memory transport"
            )
        for name in ("requests_address", "results_address"):
            address = getattr(self, name)
            if address is not None and not address.startswith(("ipc://", "tcp://")):
                raise ConfigError(f"{name} must be ipc://PATH or tcp://HOST:PORT, got {address!r}")
        get_hasher(self.hasher)
        if self.tp_size < 1:
            raise ConfigError(f"tp_size must be at least 1, got {self.tp_size}")
        if self.tokenizer_workers < 1:
            raise ConfigError(f"tokenizer_workers must be at least 1, got {self.tokenizer_workers}")
        for name in (
            "idle_wait_ms",
            "timeout_s",
            "startup_timeout_s",
            "backpressure_wait_s",
            "shutdown_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.wire_pixels not in WIRE_FORMATS:
            raise ConfigError(
                f"wire_pixels must be one of {', '.join(WIRE_FORMATS)}, got {self.wire_pixels!r}"
            )
        if self.rank_start_method not in START_METHODS:
            raise ConfigError(
                f"rank_start_method must be one of {', '.join(START_METHODS)}, "
                f"got {self.rank_start_method!r}"
            )
        if self.backpressure not in ("wait", "reject"):
            raise ConfigError(f"backpressure must be 'wait' or 'reject', got {self.backpressure!r}")
        if self.max_inflight_mb is not None and self.max_inflight_mb < 1:
            raise ConfigError(f"max_inflight_mb must be at least 1, got {self.max_inflight_mb}")
        if self.feature_cache_mb < 0:
            raise ConfigError(f"feature_cache_mb must not be negative, got {self.feature_cache_mb}")
        if self.feature_cache_mb and self.hasher not in CACHE_HASHERS:
            raise ConfigError(
                f"feature_cache_mb needs a collision-resistant hasher "
                f"({', '.join(CACHE_HASHERS)}): with {self.hasher!r} a crafted input could be "
                "served another's cached feature"
            )
        if self.feature_cache_mb and not get_strategy(self.strategy).builds_in_tokenizer:
            raise ConfigError(
                f"feature_cache_mb needs a strategy that hashes in the tokenizer (tokenizer, "
                f"zero-copy), not {self.strategy!r}"
            )
        if self.cuda_pool_mb < 1:
            raise ConfigError(f"cuda_pool_mb must be at least 1, got {self.cuda_pool_mb}")
        if self.shm_arena_mb < 1:
            raise ConfigError(f"shm_arena_mb must be at least 1, got {self.shm_arena_mb}")
        if self.shm_transport_mb is not None and self.shm_transport_mb < 1:
            raise ConfigError(f"shm_transport_mb must be at least 1, got {self.shm_transport_mb}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        if self.api_servers < 1:
            raise ConfigError(f"api_servers must be at least 1, got {self.api_servers}")
        if self.max_request_bytes is not None and self.max_request_bytes <= 0:
            raise ConfigError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        self._check_hosts()
        self._check_preprocess()

    def _check_preprocess(self) -> None:
        if self.preprocess_backend not in PREPROCESS_BACKENDS:
            raise ConfigError(
                f"preprocess_backend must be one of {', '.join(PREPROCESS_BACKENDS)}, got "
                f"{self.preprocess_backend!r}"
            )
        if self.preprocess_workers is not None and self.preprocess_workers < 1:
            raise ConfigError(
                f"preprocess_workers must be at least 1, got {self.preprocess_workers}"
            )
        if not self.preprocess_device.startswith("cuda"):
            raise ConfigError(
                f"preprocess_device must be a CUDA device (cuda, cuda:N), got "
                f"{self.preprocess_device!r}"
            )
        for name in ("preprocess_gpu_mb", "preprocess_batch_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.preprocess_batch_ms < 0:
            raise ConfigError(
                f"preprocess_batch_ms must not be negative, got {self.preprocess_batch_ms}"
            )
        if self.preprocess_cache_mb < 0:
            raise ConfigError(
                f"preprocess_cache_mb must not be negative, got {self.preprocess_cache_mb}"
            )

    def _check_hosts(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"nnodes must be at least 1, got {self.nnodes}")
        if self.tp_size % self.nnodes:
            raise ConfigError(
                f"tp_size={self.tp_size} cannot be spread evenly over nnodes={self.nnodes}"
            )
        if self.dist_init_addr is not None:
            split_host_port(self.dist_init_addr)
        if self.nnodes == 1:
            return
        if self.dist_init_addr is None:
            raise ConfigError(f"nnodes={self.nnodes} needs dist_init_addr (node 0's HOST:PORT)")
        if not transport_class(self.transport).cross_process:
            raise ConfigError(f"the {self.transport!r} transport cannot span hosts")

    def transport_options(
        self, token: str | None, *, linger_s: float | None = None
    ) -> TransportOptions:
        """What every transport of this config's groups is opened with: the one place they
        are filled. ``token`` is the run's secret (every group passes it, so a peer without
        it cannot join); ``linger_s`` bounds a sender's close (``None``: ``timeout_s``)."""
        return TransportOptions(
            token=token, arena_bytes=self.shm_transport_bytes, linger_s=linger_s
        )

    @property
    def shm_transport_bytes(self) -> int:
        """The ``shm`` transport's arena size (see ``shm_transport_mb``)."""
        if self.shm_transport_mb is not None:
            return self.shm_transport_mb << 20
        if not store_class(self.payload_store).by_reference:  # the bytes ride in the frames
            return self.shm_arena_mb << 20
        return SHM_TRANSPORT_DEFAULT_MB << 20

    @property
    def ranks_per_node(self) -> int:
        """Ranks on each host: ``tp_size / nnodes``."""
        return self.tp_size // self.nnodes

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build from a mapping; unknown keys are an error that lists the known ones.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or one out of range.
        """
        return cls().replace(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Build from a TOML file: top-level keys, or the keys of an ``[mmsched]`` table.

        Raises:
            ConfigError: the file cannot be read, is not TOML, or holds a bad value.
        """
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        table = data.get("mmsched", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [mmsched] must be a table")

        def where(key: str) -> str:
            lines = text.splitlines()
            line = next(
                (n for n, ln in enumerate(lines, 1) if ln.strip().split("=")[0].strip() == key),
                None,
            )
            return f"{path}:{line}" if line else str(path)

        return cls()._apply(table, where)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build from ``MMSCHED_*`` environment variables over the defaults.

        Raises:
            ConfigError: a variable's value does not parse, or is out of range.
        """
        return cls().with_env(env)

    def with_env(self, env: Mapping[str, str] | None = None) -> Config:
        """This config with ``MMSCHED_*`` environment variables applied on top.

        Raises:
            ConfigError: a variable's value does not parse, or is out of range.
        """
        env = os.environ if env is None else env
        fields = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(self)}
        for name in env:
            if name.startswith(ENV_PREFIX) and name not in fields and name not in SCRIPT_VARIABLES:
                raise ConfigError(f"unknown variable {name}{_near(name, list(fields))}")
        values = {f.name: _parse_env(f, env[name]) for name, f in fields.items() if name in env}
        return self._apply(
            values, lambda key: f"{ENV_PREFIX}{key.upper()}={env[ENV_PREFIX + key.upper()]!r}"
        )

    def _apply(self, values: Mapping[str, Any], source: Any) -> Config:
        """``replace(**values)``, an error naming ``source(key)`` for the key at fault."""
        try:
            return self.replace(**values)
        except ConfigError:
            for key, value in values.items():  # which one? alone, the culprit fails too
                try:
                    self.replace(**{key: value})
                except ConfigError as alone:
                    raise ConfigError(f"{source(key)}: {alone}") from None
            raise

    def replace(self, **values: Any) -> Config:
        """A copy with ``values`` changed, checked like a new config.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or one out of range.
        """
        known = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"unknown config key {key!r}{_near(key, list(known))}; "
                    f"known: {', '.join(sorted(known))}"
                )
            _check_type(known[key], value)
        return dataclasses.replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, e.g. for logging the config a run used."""
        return dataclasses.asdict(self)


def split_host_port(address: str) -> tuple[str, int]:
    """``("HOST", PORT)`` of a ``dist_init_addr``; ``PORT+2`` must be a port too.

    Raises:
        ConfigError: not ``HOST:PORT``.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65534:
        raise ConfigError(f"dist_init_addr must be HOST:PORT (PORT below 65534), got {address!r}")
    return host, int(port)


def _near(name: str, known: list[str]) -> str:
    """``"; did you mean X?"`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _check_type(f: dataclasses.Field[Any], value: Any) -> None:
    expected = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
        "int | None": (int, type(None)),
        "str | None": (str, type(None)),
    }[str(f.type)]
    if isinstance(value, bool) and bool not in expected:
        raise ConfigError(f"{f.name} must be {f.type}, got a bool")
    if not isinstance(value, expected):
        raise ConfigError(f"{f.name} must be {f.type}, got {type(value).__name__} {value!r}")


def _parse_env(f: dataclasses.Field[Any], text: str) -> Any:
    name = ENV_PREFIX + f.name.upper()
    kind = str(f.type)
    try:
        if kind == "str":
            return text
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "int | None":
            return None if text.strip().lower() in ("", "none") else int(text)
        if kind == "str | None":
            return None if text.strip().lower() in ("", "none") else text
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind}") from None
    raise ConfigError(f"{name}: unsupported field type {kind}")
