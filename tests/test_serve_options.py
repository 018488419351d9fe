"""A chat request's fields: honoured, accepted as asking for nothing else, or refused by name."""

from __future__ import annotations

import pytest

pytest.importorskip("PIL.Image", reason="the serve extra installs Pillow")

from mmsched.config import Config
from mmsched.errors import ConfigError
from mmsched.serve.media import BadRequest
from mmsched.serve.options import ACCEPTED, ChatOptions, chat_options


def test_what_the_server_honours() -> None:
    assert chat_options({"model": "m", "messages": []}) == ChatOptions()
    body = {"stream": True, "stream_options": {"include_usage": True}, "n": 1}
    assert chat_options(body) == ChatOptions(stream=True, include_usage=True)
    assert chat_options({"max_tokens": 4}).max_tokens == 4
    assert chat_options({"max_completion_tokens": 4, "max_tokens": None}).max_tokens == 4
    assert chat_options({"max_completion_tokens": None, "max_tokens": 1}).max_tokens == 1
    assert chat_options({"max_completion_tokens": 9, "max_tokens": 3}).max_tokens == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": "5"}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": []}, "stream_options"),
        ({"temperature": 1}, "temperature"),
        ({"top_p": 0.9}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"tools": []}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"top_k": 5}, "top_k"),
    ],
)
def test_refusals_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        chat_options(body)
    assert info.value.param == param


def test_null_is_not_given_and_neutral_values_pass() -> None:
    assert chat_options(dict.fromkeys(["tools", "n", "temperature", "foo"])) == ChatOptions()
    neutral = {
        "temperature": 0.0,
        "top_p": 1,
        "seed": 3,
        "user": "u",
        "metadata": {"k": "v"},
        "logprobs": False,
        "store": False,
        "stop": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
    }
    assert set(neutral) <= set(ACCEPTED)
    assert chat_options(neutral) == ChatOptions()


def test_the_config_fields_of_the_server() -> None:
    config = Config.from_env(
        {"MMSCHED_MAX_PROMPT_TOKENS": "100", "MMSCHED_SHUTDOWN_TIMEOUT_S": "1.5"}
    )
    assert (config.max_prompt_tokens, config.shutdown_timeout_s) == (100, 1.5)
    assert Config.from_env({"MMSCHED_MAX_PROMPT_TOKENS": "none"}).max_prompt_tokens is None
    assert (Config().max_prompt_tokens, Config().shutdown_timeout_s) == (32768, 5.0)
    with pytest.raises(ConfigError, match="max_prompt_tokens must be at least 1"):
        Config(max_prompt_tokens=0)
    with pytest.raises(ConfigError, match="shutdown_timeout_s must not be negative"):
        Config(shutdown_timeout_s=-1)


def test_the_serve_flags_set_the_config_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsched.cli import _config, build_parser

    monkeypatch.setenv("MMSCHED_SHUTDOWN_TIMEOUT_S", "9")  # a flag overrides the variable
    args = build_parser().parse_args(
        ["serve", "--max-prompt-tokens", "7", "--shutdown-timeout", "1.5"]
    )
    config = _config(args)
    assert (config.max_prompt_tokens, config.shutdown_timeout_s) == (7, 1.5)
    assert _config(build_parser().parse_args(["serve"])).shutdown_timeout_s == 9
