"""The original server's optional ``model``, model aliases (configured and OpenAI's own ids), and
OpenAI's ``languages[]`` and ``keywords[]`` request fields: parsed, validated, and applied by
the real Whisper weights (tiny.en, base), in-process and through a real ``bentoml serve``."""

from __future__ import annotations

import logging

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from openstt.api.state import app_state
from openstt.audio import decode_audio
from openstt.bootstrap import StartupError, load_settings
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions, load_engine
from openstt.engines.base import LoopState
from openstt.settings import Settings
from scripts.kit.speech import ASTERISK_SOUNDS
from tests.conftest import API_KEY, FOX, audio_of, clip, fox_file, needs_asterisk, normalize
from tests.inmemory import Named, inmemory_app, stand_in_cache  # Named: routing probe, answers its own name

# Real read speech (asterisk's demo-abouttotry prompt) with a product name that whisper-tiny.en
# mishears as "inter-astorisk exchange" unless told the term.
IAX_CLIP = "demo-abouttotry"
IAX_TERM = "Inter-Asterisk Exchange"


# --- settings ----------------------------------------------------------------------------------


def test_alias_setting_parses_and_resolves_repo_ids(clean_env):
    clean_env.setenv("OPEN_STT_MODELS", "whisper-tiny.en,whisper-base")
    clean_env.setenv("OPEN_STT_MODEL_ALIASES", " gpt-4o-transcribe = openai/whisper-base , my-fast=whisper-tiny.en")
    assert Settings().model_aliases == {"gpt-4o-transcribe": "whisper-base", "my-fast": "whisper-tiny.en"}
    clean_env.setenv("OPEN_STT_MODEL_ALIASES", "")  # compose passes unset variables as ""
    assert Settings().model_aliases == {}


def test_alias_flag_reaches_the_environment():
    from openstt.cli import apply_flags, build_parser

    args = build_parser().parse_args(["--model-alias", "a=whisper-base", "--model-alias", "b=whisper-tiny.en"])
    assert apply_flags(args, {})["OPEN_STT_MODEL_ALIASES"] == "a=whisper-base,b=whisper-tiny.en"


@pytest.mark.parametrize(
    "aliases, message",
    [
        ("gpt-4o-transcribe=whisper-large-v3", "names 'whisper-large-v3', which is not a served model"),
        ("gpt-4o-transcribe", "must look like alias=model"),
        ("=whisper-base", "must look like alias=model"),
        ("whisper-small=whisper-base", "is itself a model name"),
        ("a=whisper-base,a=whisper-tiny.en", "given twice"),
    ],
)
def test_bad_aliases_stop_startup(clean_env, aliases, message):
    clean_env.setenv("OPEN_STT_MODELS", "whisper-tiny.en,whisper-base")
    clean_env.setenv("OPEN_STT_MODEL_ALIASES", aliases)
    with pytest.raises(StartupError) as err:
        load_settings()
    assert "OPEN_STT_MODEL_ALIASES" in str(err.value.code) and message in str(err.value.code)


# --- routing: which model answers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def named(base_model, tmp_path_factory):
    """Routing probes for whisper-base and whisper-small (base's tokenizer for both), and their cache."""
    names = ("whisper-base", "whisper-small")
    cache = stand_in_cache(tmp_path_factory.mktemp("named"), {n: base_model for n in names})
    return [Named(CATALOG[n], cache) for n in names], cache


def routed_app(named):
    engines, cache = named
    return inmemory_app(engines, cache, default="whisper-base", model_aliases={"gpt-4o-transcribe": "whisper-small"})


@pytest.fixture(scope="module")
def routed(named):
    """One app for the tests that only send requests to it (building one takes about a second)."""
    with TestClient(routed_app(named)) as c:
        yield c


@pytest.mark.parametrize(
    "model, answers",
    [
        (None, "whisper-base"),  # no model field: the default model (the original server's contract)
        ("", "whisper-base"),  # the SDK sends "" for an explicit empty string
        ("gpt-4o-transcribe", "whisper-small"),  # configured alias
        ("gpt-4o-mini-transcribe", "whisper-base"),  # OpenAI id, not configured: the default model
        ("gpt-transcribe", "whisper-base"),
        ("gpt-4o-transcribe-diarize", "whisper-base"),
        ("whisper-small", "whisper-small"),
    ],
)
def test_which_model_answers(routed, model, answers):
    data = {} if model is None else {"model": model}
    for route in ("transcriptions", "translations"):
        r = routed.post(f"/v1/audio/{route}", data=data, files=fox_file())
        assert r.status_code == 200, r.text
        assert r.json()["text"] == answers


def test_aliases_never_hide_the_model(routed, caplog):
    with caplog.at_level(logging.INFO, logger="openstt.api"):
        r = routed.post("/v1/audio/transcriptions", data={"model": "gpt-4o-transcribe",
                                                          "response_format": "verbose_json"}, files=fox_file())
    assert r.json()["model"] == "whisper-small"
    [line] = [rec.getMessage() for rec in caplog.records if "took=" in rec.getMessage()]
    assert "model=whisper-small" in line and "requested=gpt-4o-transcribe" in line
    listed = routed.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("alias_of")) for m in listed] == [
        ("whisper-base", None), ("whisper-small", None), ("gpt-4o-transcribe", "whisper-small")]
    assert routed.get("/v1/models/gpt-4o-transcribe").json()["alias_of"] == "whisper-small"
    assert routed.get("/v1/models/gpt-4o-mini-transcribe").json()["alias_of"] == "whisper-base"
    assert "alias_of" not in routed.get("/v1/models/whisper-small").json()


def test_alias_of_an_unloaded_model_says_so(named):
    with TestClient(routed_app(named)) as routed:  # its own app: it unloads a model
        app_state(routed.app).registry.remove("whisper-small")
        r = routed.post("/v1/audio/transcriptions", data={"model": "gpt-4o-transcribe"}, files=fox_file())
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "alias of `whisper-small`, which is not loaded" in r.json()["error"]["message"]
        assert [m["id"] for m in routed.get("/v1/models").json()["data"]] == ["whisper-base"]


# --- languages[] and keywords[] on the real weights ---------------------------------------------


@pytest.fixture(scope="module")
def base_engine(base_model):
    return load_engine(CATALOG["whisper-base"], base_model, torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_languages_restrict_detection(base_engine):
    french = audio_of("fr/bonjour_monde")
    assert base_engine.transcribe(french, TranscribeOptions()).language == "fr"
    # French is not allowed: the likelier of the two candidates is picked instead
    assert base_engine.transcribe(french, TranscribeOptions(languages=("es", "it"))).language in ("es", "it")
    assert base_engine.transcribe(french, TranscribeOptions(languages=("de", "fr"))).language == "fr"


@pytest.mark.slow
def test_languages_apply_per_window_in_a_mixed_batch(base_engine):
    """Rows with and without candidates decoded in one batch each keep their own restriction."""
    from openstt.messages import WindowJob

    french = audio_of("fr/bonjour_monde")
    results = base_engine.core.decode_windows([
        WindowJob(audio=french, prompt=[], task="transcribe", language=None, temperature=0.0, languages=languages)
        for languages in ([], ["es", "it"], ["fr", "de"])])
    assert results[0].language == "fr" and results[1].language in ("es", "it") and results[2].language == "fr"


@pytest.mark.slow
@needs_asterisk
def test_keywords_fix_a_misheard_term(tiny_en_engine):
    audio = decode_audio((ASTERISK_SOUNDS / f"{IAX_CLIP}.wav").read_bytes())
    plain = tiny_en_engine.transcribe(audio, TranscribeOptions()).text
    assert IAX_TERM.lower() not in plain.lower()  # heard as "inter-astorisk exchange"
    guided = tiny_en_engine.transcribe(audio, TranscribeOptions(keywords=(IAX_TERM, "Digium"))).text
    assert IAX_TERM in guided and "Digium" in guided
    # keywords combine with a prompt, and survive a long one (the prompt is cut first)
    long_prompt = "Welcome to the telephone system. " * 60
    combined = tiny_en_engine.transcribe(audio, TranscribeOptions(prompt=long_prompt, keywords=(IAX_TERM,))).text
    assert IAX_TERM in combined


def test_keyword_prompt_layout(tiny_en_engine):
    """Keywords lead every window's prompt and the previous text is trimmed to fit behind them."""
    loop = tiny_en_engine.frontend.loop
    options = TranscribeOptions(prompt="word " * 400, keywords=("Digium", "Asterisk"))
    run = loop.run(np.full(16000, 0.1, dtype=np.float32), options, LoopState("en"))
    job = next(run)
    keywords = loop.keyword_tokens(options.keywords)
    assert job.prompt[: len(keywords)] == keywords and len(job.prompt) == loop.max_prompt_tokens
    assert loop.tokenizer.decode(keywords) == " Digium, Asterisk"


# --- end to end: the SDK and curl against `bentoml serve` ----------------------------------------


@pytest.mark.slow
def test_e2e_model_is_optional(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server.base + "/v1/audio/transcriptions", headers=headers, files=fox_file(), timeout=60)
    assert r.status_code == 200 and r.json()["text"] == FOX
    # the default model (tiny.en, the first --model) answers, and it cannot translate: proof it was used
    r = httpx.post(server.base + "/v1/audio/translations", headers=headers, data={"model": ""},
                   files=fox_file(), timeout=60)
    assert r.status_code == 400 and "English-only" in r.json()["error"]["message"]


@pytest.mark.slow
def test_e2e_openai_ids_and_aliases(sdk, server):
    french = clip("fr/bonjour_monde")
    # configured on the server: --model-alias gpt-4o-mini-transcribe=whisper-base
    r = sdk.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=french, response_format="verbose_json")
    assert r.language == "french" and r.model == "whisper-base"
    # not configured: the default model, tiny.en
    r = sdk.audio.transcriptions.create(model="gpt-4o-transcribe", file=clip("en/quick_brown_fox"),
                                        response_format="verbose_json")
    assert r.text == FOX and r.model == "whisper-tiny.en"
    lines = [line for line in server.log.read_text().splitlines() if " took=" in line]
    assert any("model=whisper-base" in line and "requested=gpt-4o-mini-transcribe" in line for line in lines)
    assert any("model=whisper-tiny.en" in line and "requested=gpt-4o-transcribe " in line for line in lines)


@pytest.mark.slow
def test_e2e_languages(sdk):
    french = clip("fr/bonjour_monde")
    r = sdk.audio.transcriptions.create(model="whisper-base", file=french, response_format="verbose_json",
                                        languages=["es", "it"])
    assert r.language in ("spanish", "italian")
    r = sdk.audio.transcriptions.create(model="whisper-base", file=french, response_format="verbose_json",
                                        languages=["fr"])
    assert r.language == "french"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-base", file=french, languages=["fr", "klingon"])
    assert err.value.body["param"] == "languages"


@pytest.mark.slow
@needs_asterisk
def test_e2e_keywords(sdk):
    path = ASTERISK_SOUNDS / f"{IAX_CLIP}.wav"
    plain = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=path).text
    guided = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=path, keywords=[IAX_TERM]).text
    assert IAX_TERM.lower() not in plain.lower() and IAX_TERM in guided
    assert normalize(guided).count("asterisk") == 1
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=path, keywords=["x" * 101])
    assert err.value.body["param"] == "keywords"
