"""Decoder steps not wasted: the temperature fallback runs in the model service on the window's one
encoding, ended rows leave the batch, the kept attempt is the likeliest one that is not a loop,
and sampling is seeded by the audio (the same file gives the same transcript). Real tiny.en."""

from __future__ import annotations

import numpy as np
import pytest

from openstt.audio import SAMPLE_RATE
from openstt.engines import TranscribeOptions
from openstt.engines.fallback import needs_fallback, settle
from openstt.messages import DecodeResult, WindowJob
from tests.conftest import audio_of, normalize


def result(avg_logprob: float, compression_ratio: float, temperature: float, no_speech_prob: float = 0.0):
    return DecodeResult(tokens=[1], token_logprobs=[avg_logprob], avg_logprob=avg_logprob, sum_logprob=avg_logprob,
                        no_speech_prob=no_speech_prob, temperature=temperature, language="en",
                        compression_ratio=compression_ratio)


def test_fallback_rule():
    job = WindowJob(audio=np.zeros(1, np.float32), prompt=[], task="transcribe", language="en", temperature=0.0,
                    fallback=[0.2, 0.4])
    assert not needs_fallback(result(-0.3, 1.5, 0.0), job)
    assert needs_fallback(result(-0.3, 2.6, 0.0), job)  # a loop
    assert needs_fallback(result(-1.4, 1.5, 0.0), job)  # unlikely
    assert not needs_fallback(result(-1.4, 1.5, 0.0, no_speech_prob=0.9), job)  # unlikely, but silence
    # a success is kept as is; when every attempt failed, the likeliest non-loop wins...
    assert settle([result(-2.0, 1.2, 0.0), result(-0.5, 1.3, 0.2)], job).temperature == 0.2
    tried = [result(-0.2, 2.8, 0.0), result(-1.5, 1.4, 0.2), result(-1.2, 1.9, 0.4)]
    assert settle(tried, job).temperature == 0.4
    # ...and when all look like loops (repetitive speech), the likeliest of all
    assert settle([result(-0.2, 2.8, 0.0), result(-0.9, 2.5, 0.2)], job).temperature == 0.0


@pytest.mark.slow
def test_fallback_reuses_the_encoding_and_keeps_the_likeliest(tiny_en_engine, monkeypatch):
    # One phrase repeated for a whole window compresses like a decoding loop (ratio > 2.4): the
    # ladder climbs, in the model service, on one encoding; every hotter attempt also loops (the
    # speech really repeats), so the likeliest attempt, the greedy one, is kept: the right text.
    core = tiny_en_engine.core
    calls = {"windows": 0, "encodes": 0, "passes": 0}

    def counting(name, method):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(core, "decode_windows", counting("windows", core.decode_windows))
    monkeypatch.setattr(core, "encode", counting("encodes", core.encode))
    monkeypatch.setattr(core, "_decode_rows", counting("passes", core._decode_rows))
    fox = audio_of("en/quick_brown_fox")
    pause = np.zeros(SAMPLE_RATE, np.float32)
    audio = np.concatenate([np.concatenate([fox, pause])] * 7)[: 29 * SAMPLE_RATE]
    hot = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en"))
    assert calls["encodes"] == calls["windows"]  # one encoding per window, whatever the retries
    assert calls["passes"] >= calls["windows"] + 5  # the whole ladder: 0.2 ... 1.0 after greedy
    assert hot.segments[0].compression_ratio > 2.4 and hot.segments[0].temperature == 0.0
    assert normalize(hot.text).count("quick brown fox") >= 5

    cold = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en", temperature_fallback=False))
    assert [s.tokens for s in cold.segments] == [s.tokens for s in hot.segments]


@pytest.mark.slow
def test_sampling_is_seeded_by_the_audio(tiny_en_engine):
    core = tiny_en_engine.core
    fox = audio_of("en/quick_brown_fox")
    job = WindowJob(audio=fox, prompt=[], task="transcribe", language="en", temperature=1.0,
                    compression_ratio_threshold=None, logprob_threshold=None)
    first, again = core.decode_windows([job])[0], core.decode_windows([job])[0]
    assert first.temperature == 1.0 and first.tokens == again.tokens
    # whatever the window is batched with, and wherever it sits in the batch
    other = job.model_copy(update={"audio": audio_of("en/hello_world")})
    assert core.decode_windows([other, job])[1].tokens == first.tokens


@pytest.mark.slow
def test_ended_rows_leave_the_batch(tiny_en_engine):
    """A short window ends long before a full one: from then on only the full one is decoded, and
    each gets exactly the tokens it gets when decoded alone."""
    core = tiny_en_engine.core
    short = audio_of("en/hello_world")
    full = np.concatenate([audio_of("en/counting"), audio_of("en/quick_brown_fox")] * 3)[: 29 * SAMPLE_RATE]
    jobs = [WindowJob(audio=a, prompt=[], task="transcribe", language="en", temperature=0.0) for a in (short, full)]
    alone = [core.decode_windows([job])[0].tokens for job in jobs]
    core.decoder_rows.clear()
    together = core.decode_windows(jobs)
    rows = list(core.decoder_rows)
    assert [r.tokens for r in together] == alone
    assert rows[0] == 2 and rows[-1] == 1 and rows == sorted(rows, reverse=True)
    # decoder rows actually run: the short row stopped costing once it ended
    assert sum(rows) == len(alone[0]) + 1 + len(alone[1]) + 1
