"""Beam search (``beam_size``) at temperature 0: openai/whisper's ``BeamSearchDecoder`` (patience 1,
ranked by sum_logprob / length), batched with greedy and sampled rows. beam_size 1 is the greedy
decoder unchanged. The API's ``beam_size`` field, the server default, and its flag. Real tiny.en."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from openstt.api.app import create_app
from openstt.api.state import app_state
from openstt.audio import SAMPLE_RATE
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions
from openstt.engines.base import Engine, TranscriptionRun, UnsupportedRequest
from openstt.transcript import Segment
from openstt.engines.base import LoopState
from openstt.messages import WindowJob
from openstt.registry import ModelRegistry
from scripts.kit.speech import english_clip, wer
from tests.conftest import FOX, audio_of, fox_file, needs_asterisk, reference


def job(audio: np.ndarray, beam_size: int = 1, temperature: float = 0.0, prompt: list[int] | None = None):
    return WindowJob(audio=audio, prompt=prompt or [], task="transcribe", language="en", temperature=temperature,
                     beam_size=beam_size, compression_ratio_threshold=None, logprob_threshold=None)


def score(result) -> float:
    """openai/whisper's ranking: sum of logprobs (eot included) over the number of tokens."""
    return result.sum_logprob / max(len(result.tokens), 1)


def openai_beam_search(core, audio: np.ndarray, beam_size: int, prompt: list[int] | None = None):
    """A literal port of openai/whisper's BeamSearchDecoder + MaximumLikelihoodRanker: no KV cache,
    no batching, one beam job, the sequences in Python dicts. Returns (tokens, sum_logprob)."""
    t = core.table
    with torch.inference_mode():
        encoded = core.encode(core.features([audio])).repeat(beam_size, 1, 1)
        initial = ([t.sot_prev] + prompt if prompt else []) + core.sot_sequence("en", "transcribe")
        begin = len(initial)
        tokens = torch.tensor([initial] * beam_size)
        sum_logprobs = torch.zeros(beam_size)
        finished: dict[tuple, float] = {}
        for _ in range(core.n_text_ctx // 2):
            hidden = core.model.model.decoder(input_ids=tokens, encoder_hidden_states=encoded).last_hidden_state
            logits = core._logits(hidden[:, -1])
            core.rules.apply(logits, tokens, begin)
            logprobs = torch.log_softmax(logits, dim=-1)
            scores, new_finished = {}, {}
            for j in range(beam_size):
                prefix = tokens[j].tolist()
                for logprob, token in zip(*logprobs[j].topk(beam_size + 1)):
                    scores[tuple(prefix + [token.item()])] = (sum_logprobs[j] + logprob).item()
            kept = []
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == t.eot:
                    new_finished[sequence] = scores[sequence]
                else:
                    sum_logprobs[len(kept)] = scores[sequence]
                    kept.append(sequence)
                    if len(kept) == beam_size:
                        break
            tokens = torch.tensor(kept)
            for sequence in sorted(new_finished, key=new_finished.get, reverse=True):
                if len(finished) >= beam_size:
                    break
                finished[sequence] = new_finished[sequence]
            if len(finished) >= beam_size:
                break
        candidates = [(list(s[begin:-1]), v) for s, v in finished.items()]
    return max(candidates, key=lambda c: c[1] / max(len(c[0]), 1))


@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
def test_beam_size_one_is_the_greedy_decoder(tiny_en_engine):
    core = tiny_en_engine.core
    fox, counting = audio_of("en/quick_brown_fox"), audio_of("en/counting")
    greedy = [WindowJob(audio=a, prompt=[], task="transcribe", language="en", temperature=0.0) for a in (fox, counting)]
    assert greedy[0].beam_size == 1 and TranscribeOptions().beam_size == 1
    default = core.decode_windows(greedy)
    core.decoder_rows.clear()
    one = core.decode_windows([job(fox, 1), job(counting, 1)])
    assert [r.tokens for r in one] == [r.tokens for r in default]
    assert [(r.sum_logprob, r.avg_logprob, r.token_logprobs) for r in one] == \
        [(r.sum_logprob, r.avg_logprob, r.token_logprobs) for r in default]
    assert core.text_of(one[0].tokens).strip() == FOX
    assert max(core.decoder_rows) == 2  # one row per greedy window


@pytest.mark.slow
@pytest.mark.parametrize("name, prompt", [("en/counting", None), ("en/hello_world", [50, 60, 70])])
def test_beam_search_is_openai_whisper_s(tiny_en_engine, name, prompt):
    """The batched, KV-cached beam search picks exactly the hypothesis openai/whisper's does."""
    core = tiny_en_engine.core
    audio = audio_of(name)
    expected_tokens, expected_sum = openai_beam_search(core, audio, 5, prompt)
    result = core.decode_windows([job(audio, 5, prompt=prompt)])[0]
    assert result.tokens == expected_tokens
    assert result.sum_logprob == pytest.approx(expected_sum, abs=1e-4)
    # the token logprobs are the chosen path's own; the sum also counts the eot
    assert len(result.token_logprobs) == len(result.tokens)
    assert sum(result.token_logprobs) >= result.sum_logprob
    assert result.avg_logprob == pytest.approx(result.sum_logprob / (len(result.tokens) + 1))


def _clips(with_asterisk: bool) -> list[tuple[np.ndarray, str]]:
    clips = [(audio_of(n), reference(n)) for n in ("en/quick_brown_fox", "en/counting", "en/hello_world")]
    return clips + ([english_clip(s) for s in (15, 22)] if with_asterisk else [])


def _compare(core, clips):
    for audio, ref in clips:
        greedy, beam = core.decode_windows([job(audio, 1), job(audio, 5)])
        assert score(beam) >= score(greedy) - 1e-4  # at least as likely a sequence, on these clips
        greedy_wer, beam_wer = wer(ref, core.text_of(greedy.tokens)), wer(ref, core.text_of(beam.tokens))
        assert beam_wer <= greedy_wer + 0.05, (core.text_of(greedy.tokens), core.text_of(beam.tokens))
        assert beam.temperature == 0.0 and beam.language == "en"


@pytest.mark.slow
def test_beam_search_is_as_likely_and_as_accurate_as_greedy(tiny_en_engine):
    _compare(tiny_en_engine.core, _clips(False))


@pytest.mark.slow
@needs_asterisk
def test_beam_search_on_real_speech(tiny_en_engine):
    _compare(tiny_en_engine.core, _clips(True)[3:])
    # long-form: the whole procedure with beams, as a request would run it
    audio, ref = english_clip(50)
    greedy = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en"))
    beam = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en", beam_size=5))
    assert wer(ref, beam.text) <= wer(ref, greedy.text) + 0.03
    assert beam.segments and all(s.temperature == 0.0 for s in beam.segments)


@pytest.mark.slow
def test_mixed_batch_decodes_each_job_as_alone(tiny_en_engine):
    """Greedy, beam (two sizes, one with a prompt) and sampled jobs in one batch: each gets the
    tokens it gets alone; the batch starts with all their rows."""
    core = tiny_en_engine.core
    jobs = [job(audio_of("en/quick_brown_fox"), 1), job(audio_of("en/counting"), 5),
            job(audio_of("en/hello_world"), 5, temperature=0.4),  # sampled: best of 5, beam_size ignored
            job(audio_of("en/quick_brown_fox"), 3, prompt=[50, 60, 70])]
    alone = [core.decode_windows([j])[0] for j in jobs]
    core.decoder_rows.clear()
    together = core.decode_windows(jobs)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.temperature for r in together] == [0.0, 0.0, 0.4, 0.0]
    assert [r.sum_logprob for r in together] == pytest.approx([r.sum_logprob for r in alone], abs=1e-4)
    rows = list(core.decoder_rows)
    assert rows[0] == 1 + 5 + 5 + 3 and rows == sorted(rows, reverse=True)


@pytest.mark.slow
def test_a_finished_beam_job_leaves_the_batch(tiny_en_engine):
    """A short beam job's rows decode only until it has its hypotheses; a full window goes on alone."""
    core = tiny_en_engine.core
    short = job(audio_of("en/hello_world"), 5)
    full = job(np.concatenate([audio_of("en/counting"), audio_of("en/quick_brown_fox")] * 3)[: 29 * SAMPLE_RATE])
    core.decoder_rows.clear()
    alone_short = core.decode_windows([short])[0]
    beam_steps = list(core.decoder_rows)
    assert set(beam_steps) == {5}
    core.decoder_rows.clear()
    alone_full = core.decode_windows([full])[0]
    greedy_steps = len(core.decoder_rows)
    assert len(beam_steps) < greedy_steps
    core.decoder_rows.clear()
    together = core.decode_windows([short, full])
    rows = list(core.decoder_rows)
    assert [r.tokens for r in together] == [alone_short.tokens, alone_full.tokens]
    assert rows == [6] * len(beam_steps) + [1] * (greedy_steps - len(beam_steps))


def test_beams_unfinished_at_the_length_limit(tiny_en_engine, monkeypatch):
    """At the token limit the likeliest unfinished beams are the hypotheses (as openai/whisper's
    ``finalize``); without eot, the average is over the tokens alone."""
    core = tiny_en_engine.core
    monkeypatch.setattr(core, "n_text_ctx", 16)  # 8 tokens at most after <|startoftranscript|>
    audio = np.concatenate([audio_of("en/counting"), audio_of("en/quick_brown_fox")])
    greedy, beam = core.decode_windows([job(audio, 1), job(audio, 4)])
    assert len(greedy.tokens) == len(beam.tokens) == 8
    assert beam.avg_logprob == pytest.approx(beam.sum_logprob / 8)
    assert sum(beam.token_logprobs) == pytest.approx(beam.sum_logprob, abs=1e-4)
    assert beam.sum_logprob >= greedy.sum_logprob - 1e-4


@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
def test_fallback_temperatures_sample_without_beams(tiny_en_engine, monkeypatch):
    """A beam window that needs a fallback is retried at the job's temperatures, sampled (best of 5)."""
    core = tiny_en_engine.core
    seen = []
    original = core._decode_rows

    def spy(encoded, jobs, languages, temperatures):
        seen.append(list(temperatures))
        return original(encoded, jobs, languages, temperatures)

    monkeypatch.setattr(core, "_decode_rows", spy)
    window = WindowJob(audio=audio_of("en/hello_world"), prompt=[], task="transcribe", language="en", temperature=0.0,
                       beam_size=5, fallback=[0.2, 0.4], logprob_threshold=0.0,
                       no_speech_threshold=None)  # every attempt "fails"
    result = core.decode_windows([window])[0]
    assert seen == [[0.0], [0.2], [0.4]]
    assert result.temperature in (0.0, 0.2, 0.4)


def test_voxtral_refuses_beams():
    from openstt.engines.voxtral import VoxtralFrontend

    frontend = VoxtralFrontend.__new__(VoxtralFrontend)
    frontend.spec = CATALOG["voxtral-mini"]
    frontend.check(TranscribeOptions(language="en"))
    with pytest.raises(UnsupportedRequest) as err:
        frontend.check(TranscribeOptions(language="en", beam_size=5))
    assert err.value.param == "beam_size"


# --- the API field, the server default, the flag ---------------------------------------------------


class _Capture(Engine):
    """Records the options each request decodes with."""

    def __init__(self, spec):
        super().__init__(spec)
        self.options: list[TranscribeOptions] = []

    def start(self, audio, options: TranscribeOptions) -> TranscriptionRun:
        self.options.append(options)
        segment = Segment(0, 0, 0.0, 1.0, " ok", [], 0.0, 0.0, 1.0, 0.0)
        return TranscriptionRun(state=LoopState("en"), duration=len(audio) / 16000, segments=iter([segment]))


@pytest.fixture()
def captured():
    whisper, voxtral = _Capture(CATALOG["whisper-tiny"]), _Capture(CATALOG["voxtral-mini"])
    app = create_app()
    app_state(app).registry = ModelRegistry([whisper, voxtral], "whisper-tiny")
    with TestClient(app) as client:
        yield app, client, whisper, voxtral


@pytest.mark.parametrize("route", ["/v1/audio/transcriptions", "/v1/audio/translations"])
@pytest.mark.parametrize("value", ["0", "11", "abc", "2.5", "-1", "²"])
def test_invalid_beam_size_is_400(captured, route, value):
    _, client, whisper, _ = captured
    r = client.post(route, data={"model": "whisper-tiny", "beam_size": value}, files=fox_file())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("beam_size", "invalid_value", "invalid_request_error")
    assert not whisper.options


@pytest.mark.parametrize("route", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_beam_size_field_and_server_default(captured, route):
    app, client, whisper, voxtral = captured
    assert app_state(app).beam_size == 1
    for data, default, expected in [({}, 1, 1), ({"beam_size": "5"}, 1, 5), ({}, 4, 4), ({"beam_size": "1"}, 4, 1),
                                    ({"beam_size": "10"}, 4, 10)]:
        app_state(app).beam_size = default
        r = client.post(route, data={"model": "whisper-tiny", **data}, files=fox_file())
        assert r.status_code == 200, r.text
        assert whisper.options[-1].beam_size == expected
    # the server default is Whisper's: other families decode without beams
    app_state(app).beam_size = 5
    assert client.post(route, data={"model": "voxtral-mini"}, files=fox_file()).status_code == 200
    assert voxtral.options[-1].beam_size == 1


def test_beam_search_through_the_api(tiny_en_engine):
    import openai

    app = create_app()
    app_state(app).registry = ModelRegistry([tiny_en_engine], "whisper-tiny.en")
    with TestClient(app, base_url="http://testserver") as http:
        sdk = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)
        text = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("fox.wav", fox_file()["file"][1]),
                                               extra_body={"beam_size": 5}).text
    assert text == FOX


def test_beam_size_setting_and_flag(monkeypatch):
    from openstt.bootstrap import attach
    from openstt.cli import apply_flags, build_parser
    from openstt.settings import Settings

    for key in ("OPEN_STT_BEAM_SIZE", "OPEN_STT_MODELS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny.en")
    assert Settings().beam_size == 1
    env = apply_flags(build_parser().parse_args(["--beam-size", "3"]), {})
    assert env["OPEN_STT_BEAM_SIZE"] == "3"
    monkeypatch.setenv("OPEN_STT_BEAM_SIZE", env["OPEN_STT_BEAM_SIZE"])
    settings = Settings()
    assert settings.beam_size == 3
    app = create_app()
    attach(app, ModelRegistry([_Capture(CATALOG["whisper-tiny.en"])], "whisper-tiny.en"), settings)
    assert app_state(app).beam_size == 3
    for bad in ("0", "11"):
        monkeypatch.setenv("OPEN_STT_BEAM_SIZE", bad)
        with pytest.raises(ValueError):
            Settings()
