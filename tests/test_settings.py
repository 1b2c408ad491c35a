"""Configuration: env variables, CLI flags over env, and fail-fast startup errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from openstt.bootstrap import StartupError, load_settings, prepare_models
from openstt.cli import apply_flags, build_parser
from openstt.settings import Settings, rust_log_level


@pytest.fixture(autouse=True)
def no_settings(clean_env):
    clean_env.delenv("RUST_LOG", raising=False)


def test_env_defaults(monkeypatch):
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny.en, whisper-base")
    s = Settings()
    assert s.models == ["whisper-tiny.en", "whisper-base"]
    assert s.default_model == "whisper-tiny.en" and s.port == 8080 and s.host == "0.0.0.0"
    assert not s.force_cpu and not s.download and s.api_key == [] and s.log_level == "info"


def test_env_values(monkeypatch):
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny,whisper-base")
    monkeypatch.setenv("OPEN_STT_DEFAULT_MODEL", "whisper-base")
    monkeypatch.setenv("OPEN_STT_PORT", "9000")
    monkeypatch.setenv("OPEN_STT_FORCE_CPU", "1")
    monkeypatch.setenv("OPEN_STT_DOWNLOAD", "true")
    monkeypatch.setenv("OPEN_STT_API_KEY", "sk-one,sk-two")
    s = Settings()
    assert (s.default_model, s.port, s.force_cpu, s.download) == ("whisper-base", 9000, True, True)
    assert [k.get_secret_value() for k in s.api_key] == ["sk-one", "sk-two"]
    assert "sk-one" not in repr(s)  # keys never end up in logs through the settings object


@pytest.mark.parametrize(
    "rust_log, expected",
    [("debug", "debug"), ("warn,open_stt=debug", "warn"), ("open_stt_server=trace", "trace"), ("nonsense", None)],
)
def test_rust_log_words(rust_log, expected):
    assert rust_log_level(rust_log) == expected


def test_rust_log_is_honoured_and_open_stt_level_wins(monkeypatch):
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny.en")
    monkeypatch.setenv("RUST_LOG", "warn")
    assert Settings().python_log_level == logging.WARNING
    monkeypatch.setenv("OPEN_STT_LOG_LEVEL", "debug")
    assert Settings().python_log_level == logging.DEBUG


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "no model configured"),
        ({"OPEN_STT_MODELS": "whisper-huge"}, "unknown model(s) whisper-huge. Available: whisper-tiny,"),
        ({"OPEN_STT_MODELS": "whisper-tiny.en", "OPEN_STT_DEFAULT_MODEL": "whisper-base"}, "not among the served"),
        ({"OPEN_STT_MODELS": "whisper-tiny.en", "OPEN_STT_LOG_LEVEL": "loud"}, "log level must be one of"),
    ],
)
def test_invalid_configuration_stops_startup(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StartupError) as err:
        load_settings()
    assert message in str(err.value.code)


def test_one_settings_object_per_process(monkeypatch):
    from openstt.bootstrap import get_settings

    get_settings.cache_clear()
    try:
        with pytest.raises(StartupError, match="no model configured"):  # invalid: refused at every call
            get_settings()
        monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny.en")
        first = get_settings()
        monkeypatch.setenv("OPEN_STT_MODELS", "whisper-base")
        assert get_settings() is first and first.models == ["whisper-tiny.en"]  # built once, then kept
    finally:
        get_settings.cache_clear()


def test_flags_win_over_env():
    env = {"OPEN_STT_MODELS": "whisper-base", "OPEN_STT_PORT": "1234", "OPEN_STT_API_KEY": "sk-env"}
    args = build_parser().parse_args(["--model", "whisper-tiny.en", "--model", "whisper-tiny", "--port", "8081",
                                      "--force-cpu", "--download"])
    out = apply_flags(args, env)
    assert out["OPEN_STT_MODELS"] == "whisper-tiny.en,whisper-tiny"
    assert out["OPEN_STT_PORT"] == "8081"
    assert out["OPEN_STT_API_KEY"] == "sk-env"  # not given as a flag: env stays
    assert out["OPEN_STT_FORCE_CPU"] == "true" and out["OPEN_STT_DOWNLOAD"] == "true"
    # flags not given leave the env alone entirely
    assert apply_flags(build_parser().parse_args([]), env) == env


def test_missing_cache_without_download_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-small")
    with pytest.raises(StartupError) as err:
        prepare_models(load_settings())
    assert "not in the Hugging Face cache" in str(err.value.code) and "--download" in str(err.value.code)


def test_download_respects_hf_hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-small")
    monkeypatch.setenv("OPEN_STT_DOWNLOAD", "true")
    with pytest.raises(StartupError, match="HF_HUB_OFFLINE is set"):
        prepare_models(load_settings())


def test_cached_model_is_never_downloaded_again(monkeypatch, hf_cache):
    # --download with an unreachable hub: a cached model must resolve without any request
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from openstt.catalog import CATALOG
    from openstt.hub import resolve_model

    path = resolve_model(CATALOG["whisper-tiny.en"], download=True)
    assert (path / "model.safetensors").exists()


def test_voxtral_passes_startup_checks_and_needs_its_weights(monkeypatch, tmp_path):
    # the engine exists: what stops an uncached Voxtral is the missing snapshot, named as such
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("OPEN_STT_MODELS", "voxtral-mini")
    monkeypatch.setenv("OPEN_STT_MEMORY_CHECK", "off")  # float32 on a small CPU box would be refused first
    with pytest.raises(StartupError, match=r"'voxtral-mini' \(mistralai/Voxtral-Mini-3B-2507\) is not in the Hugging"):
        prepare_models(load_settings())


@pytest.mark.slow  # the CLI in a new interpreter, three times: seconds of imports
@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {}, "no model configured"),
        (["--model", "nope"], {}, "unknown model(s) nope"),
        (["--model", "whisper-medium"], {"HF_HUB_CACHE": "/nonexistent-cache"}, "add --download"),
    ],
)
def test_cli_exits_with_message(args, env, message, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPEN_STT_")} | env
    proc = subprocess.run([sys.executable, "-m", "openstt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert message.replace("add --download", "--download") in proc.stderr


def test_model_management_settings(monkeypatch):
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny.en")
    s = Settings()
    assert s.enable_model_management is False and s.model_idle_ttl == 0
    monkeypatch.setenv("OPEN_STT_MODEL_IDLE_TTL", "")  # compose passes unset variables as ""
    assert Settings().model_idle_ttl == 0
    args = build_parser().parse_args(["--enable-model-management", "--model-idle-ttl", "300"])
    for key, value in apply_flags(args, {}).items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.enable_model_management is True and s.model_idle_ttl == 300
    monkeypatch.setenv("OPEN_STT_MODEL_IDLE_TTL", "-1")
    with pytest.raises(ValueError):
        Settings()


def test_missing_model_message_for_clients_has_no_paths(tmp_path):
    from openstt.catalog import CATALOG
    from openstt.hub import ModelNotAvailable, resolve_model

    with pytest.raises(ModelNotAvailable) as err:
        resolve_model(CATALOG["whisper-small"], download=False, cache=tmp_path)
    assert str(tmp_path) in str(err.value)  # the operator's message says where it looked
    assert str(tmp_path) not in err.value.public and "--download" in err.value.public
    assert not err.value.download_failed
