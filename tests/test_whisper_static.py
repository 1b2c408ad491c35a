"""The static-cache decoder (``engines/whisper_static.py``, issue #28): bucket choice, slot reuse,
and the same tokens as the eager decoder on real weights. CUDA graphs replay this same step; they
are checked on a GPU by ``scripts/gpu_bench.py``."""

from __future__ import annotations

import pytest

from openstt.engines.whisper_static import BUCKETS, Slots, bucket_for


def test_a_batch_takes_the_smallest_bucket_that_holds_it():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]
    assert bucket_for(3, (4, 16)) == 4
    with pytest.raises(ValueError):
        bucket_for(BUCKETS[-1] + 1)


def test_a_row_that_ends_frees_its_slot_for_a_new_row():
    slots = Slots(4)
    assert [slots.take(row) for row in "abcd"] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        slots.take("e")
    assert slots.release("b") == 1 and slots.free == 1
    assert slots.take("e") == 1  # the lowest free slot, between two steps
    assert slots.of == {"a": 0, "c": 2, "d": 3, "e": 1}
    with pytest.raises(ValueError):
        slots.take("a")


@pytest.fixture(scope="module")
def cores(tiny_en_engine):
    from openstt.engines.whisper_core import WhisperCore

    core = tiny_en_engine.core
    static = WhisperCore(core.model, core.processor, core.table, core.multilingual, core.device, core.dtype,
                         core.aligner, decoder="static")
    return core, static


@pytest.mark.slow
@pytest.mark.parametrize("how", ["greedy", "prompt", "beam", "sampled"])
def test_static_decoder_gives_the_eager_tokens(cores, how):
    """Windows of 4 and 12 s of real speech in one batch (rows end at different steps and leave; beam
    rows are reordered), token for token the same as transformers' decoder with its dynamic cache."""
    from openstt.messages import WindowJob
    from scripts.kit.speech import english_clip

    eager, static = cores
    clips = [english_clip(seconds)[0][:30 * 16000] for seconds in (4, 12)]
    prompt = eager.tokenizer.encode(" Hello, this is a prompt.", add_special_tokens=False) if how == "prompt" else []
    jobs = [WindowJob(audio=clip, prompt=prompt if i == 1 else [], task="transcribe", language="en",
                      temperature=0.6 if how == "sampled" else 0.0, beam_size=3 if how == "beam" else 1)
            for i, clip in enumerate(clips)]
    expected, got = eager.decode_windows(jobs), static.decode_windows(jobs)
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert all(len(r.tokens) > 5 for r in got)
    assert [r.avg_logprob for r in got] == pytest.approx([r.avg_logprob for r in expected], abs=1e-4)
    # the buckets' slots are kept and reused batch after batch
    rows = {"greedy": 2, "prompt": 2, "beam": 6, "sampled": 10}[how]
    decoder = static._static[bucket_for(rows)]
    # the rows that ended before the last gave their slots back
    assert len(decoder.alive) < rows and sorted(decoder.slots.of) == sorted(decoder.alive)
    assert decoder.slots.free == decoder.size - len(decoder.alive)


@pytest.mark.slow
def test_buckets_share_one_set_of_slots_warmed_at_load(cores):
    """``warm`` (at load) prepares every bucket up to the batch on one shared storage; a batch
    needing a larger bucket (beams) grows it once, and decoding still gives the eager tokens."""
    from openstt.engines.whisper_core import WhisperCore
    from openstt.messages import WindowJob
    from scripts.kit.speech import english_clip

    eager, _ = cores
    static = WhisperCore(eager.model, eager.processor, eager.table, eager.multilingual, eager.device, eager.dtype,
                         eager.aligner, decoder="static")
    assert WhisperCore(eager.model, eager.processor, eager.table, eager.multilingual, eager.device, eager.dtype,
                       eager.aligner).warm(8) is None  # nothing to warm for the eager decoder
    line = static.warm(8)
    storage = static._storage
    assert line.startswith("static decoder warmed for buckets 1-8 rows in ") and line.endswith(" MB")
    assert storage.rows == 8 and sorted(static._static) == [1, 2, 4, 8]
    for decoder in static._static.values():  # views of the same slots: 8 rows in all, not 1+2+4+8
        assert decoder.keys[0].data_ptr() == storage.keys[0].data_ptr()
    layers, width = len(eager.model.model.decoder.layers), eager.model.config.d_model
    per_row = 2 * layers * width * (448 + 1500) * 4 + 448  # K and V, self and cross, float32; the mask
    assert storage.bytes == 8 * per_row

    clips = [english_clip(seconds)[0][:30 * 16000] for seconds in (3, 6)]
    jobs = [WindowJob(audio=c, prompt=[], task="transcribe", language="en", temperature=0.0) for c in clips]
    assert [r.tokens for r in static.decode_windows(jobs)] == [r.tokens for r in eager.decode_windows(jobs)]
    assert static._storage is storage  # 2 rows: bucket 2, the warmed slots
    beams = [WindowJob(audio=c, prompt=[], task="transcribe", language="en", temperature=0.0, beam_size=5)
             for c in clips]  # 10 rows: bucket 16
    assert [r.tokens for r in static.decode_windows(beams)] == [r.tokens for r in eager.decode_windows(beams)]
    assert static._storage.rows == 16 and sorted(static._static) == [16]
