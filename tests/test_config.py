"""Config from a dict, a TOML file and the environment; names resolved with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsched import Config, ConfigError, UnknownNameError


def test_defaults() -> None:
    config = Config()
    # The docs' recommendation for one host: zero-copy (tokenizer + shm) over zmq.
    assert (config.transport, config.strategy, config.payload_store, config.hasher) == (
        "zmq",
        "tokenizer",
        "shm",
        "blake3",
    )


def test_from_dict() -> None:
    config = Config.from_dict({"transport": "torch", "strategy": "per-rank", "tp_size": 4})
    assert (config.strategy, config.tp_size) == ("per-rank", 4)


def test_from_toml_top_level_or_table(tmp_path: Path) -> None:
    flat = tmp_path / "flat.toml"
    flat.write_text('strategy = "entry-broadcast"\ntp_size = 2\n')
    table = tmp_path / "table.toml"
    table.write_text('[mmsched]\nhasher = "sha256"\nmax_request_bytes = 1000\n')
    assert Config.from_toml(flat).strategy == "entry-broadcast"
    assert Config.from_toml(table).max_request_bytes == 1000


def test_env_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('strategy = "per-rank"\ntp_size = 2\n')
    env = {
        "MMSCHED_STRATEGY": "tokenizer",
        "MMSCHED_TRANSPORT": "torch",
        "MMSCHED_ALLOW_PICKLE": "yes",
        "MMSCHED_RESULTS_ADDRESS": "tcp://127.0.0.1:*",
        "MMSCHED_IDLE_WAIT_MS": "2.5",
        "MMSCHED_MAX_REQUEST_BYTES": "none",
        "OTHER": "ignored",
    }
    config = Config.from_toml(path).with_env(env)
    assert (config.strategy, config.tp_size, config.allow_pickle) == ("tokenizer", 2, True)
    assert config.results_address == "tcp://127.0.0.1:*" and config.requests_address is None
    assert config.idle_wait_ms == 2.5 and config.max_request_bytes is None


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"transport": "carrier-pigeon"}, UnknownNameError, "known: memory, shm, torch, zmq"),
        ({"strategy": "fastest"}, UnknownNameError, "per-rank, tokenizer, zero-copy"),
        ({"hasher": "md5"}, UnknownNameError, "blake3, sglang-0.5.23, sha256, xxh3"),
        ({"tp": 4}, ConfigError, "unknown config key 'tp'; known:"),
        ({"tp_size": 0}, ConfigError, "at least 1"),
        ({"tp_size": "4"}, ConfigError, "tp_size must be int"),
        ({"allow_pickle": 1}, ConfigError, "allow_pickle must be bool"),
        ({"allow_pickle": "yes"}, ConfigError, "allow_pickle must be bool"),
        ({"payload_store": "nfs"}, UnknownNameError, "known: cuda-ipc, inline, pinned, shm"),
        ({"requests_address": "http://x"}, ConfigError, "ipc://PATH or tcp://HOST:PORT"),
        ({"results_address": 5}, ConfigError, "results_address must be str | None"),
        ({"tp_size": True}, ConfigError, "got a bool"),
        ({"timeout_s": -1}, ConfigError, "must not be negative"),
        ({"max_request_bytes": 0}, ConfigError, "must be positive"),
        ({"rank_start_method": "fork"}, ConfigError, "one of forkserver, spawn, got 'fork'"),
    ],
)
def test_bad_values_are_named(
    values: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Config.from_dict(values)


def test_bad_env_value_is_named() -> None:
    with pytest.raises(ConfigError, match="MMSCHED_TP_SIZE='four'"):
        Config.from_env({"MMSCHED_TP_SIZE": "four"})


def test_zero_copy_is_a_preset_of_strategy_and_store() -> None:
    for transport in ("torch", "zmq", "shm", "memory"):
        config = Config(strategy="zero-copy", transport=transport)
        assert (config.strategy, config.payload_store) == ("tokenizer", "shm")
    assert Config.from_dict({"strategy": "zero-copy"}).payload_store == "shm"
    assert Config().replace(strategy="zero-copy").replace(payload_store="inline").strategy == (
        "tokenizer"
    )


def test_a_misspelt_variable_is_an_error_naming_the_near_one() -> None:
    with pytest.raises(
        ConfigError, match="unknown variable MMSCHED_TP_SIZ; did you mean MMSCHED_TP_SIZE"
    ):
        Config.from_env({"MMSCHED_TP_SIZ": "4"})
    # The set-up scripts' own variables are not config fields, and not errors.
    Config.from_env({"MMSCHED_TORCH": "torch==2.13.0", "MMSCHED_EXTRAS": "[serve]"})


def test_a_bad_value_names_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"MMSCHED_TP_SIZE='0': tp_size must be"):
        Config.from_env({"MMSCHED_TP_SIZE": "0"})
    with pytest.raises(ConfigError, match=r"MMSCHED_TRANSPORT='zmqq': .*zmq"):
        Config.from_env({"MMSCHED_TRANSPORT": "zmqq"})


def test_a_bad_file_names_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mmsched.toml"
    path.write_text('[mmsched]\nstrategy = "tokenizer"\ntp_size = -2\n')
    with pytest.raises(ConfigError, match=rf"{path}:3: tp_size must be"):
        Config.from_toml(path)
    path.write_text('[mmsched]\nstrategy = "tokenizer"\ntp_sise = 2\n')
    with pytest.raises(
        ConfigError, match=rf"{path}:3: unknown config key 'tp_sise'; did you mean tp_size"
    ):
        Config.from_toml(path)
    path.write_text("tp_size = = 2\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line 1"):
        Config.from_toml(path)


def test_the_shm_transport_arena_is_sized_for_what_travels_there() -> None:
    # Headers only when a store carries the bytes; the bytes too under the inline store.
    assert Config(payload_store="shm").shm_transport_bytes == 256 << 20
    assert Config(payload_store="inline", shm_arena_mb=512).shm_transport_bytes == 512 << 20
    assert Config(shm_transport_mb=8).shm_transport_bytes == 8 << 20
    assert Config.from_env({"MMSCHED_SHM_TRANSPORT_MB": "16"}).shm_transport_mb == 16
    with pytest.raises(ConfigError, match="shm_transport_mb"):
        Config(shm_transport_mb=0)
