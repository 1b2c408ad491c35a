"""128-mel Whisper (large-v3 / large-v3-turbo / distil-large-v3 layout) through the whole stack.

No real 128-mel weights are obtainable here, so this builds a *tiny random-weight* checkpoint with
128 mel bins (and the real multilingual tokenizer and generation config of base) and installs it as
openai/whisper-large-v3. It asserts the code path — the feature extractor comes from the
checkpoint (128 bins, not a hard-coded 80), the encoder accepts it, the decoding loop, batching and
response formats work — not the words, which are noise from random weights. It is served, through
the SDK, beside Voxtral in ``test_voxtral.py::test_served_end_to_end`` (one server for both).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openstt.audio import decode_audio
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions, load_engine
from openstt.hub import install_snapshot, resolve_model
from scripts.kit.checkpoints import build_whisper
from tests.conftest import clip


@pytest.fixture(scope="module")
def mel128_cache(base_model, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-mel128") / "hub"
    install_snapshot(build_whisper(tmp_path_factory.mktemp("mel128"), base_model), "openai/whisper-large-v3",
                     cache=cache)
    return cache


@pytest.mark.slow
def test_engine_uses_the_checkpoints_128_bins(mel128_cache):
    spec = CATALOG["whisper-large-v3"]
    engine = load_engine(spec, resolve_model(spec, download=False, cache=mel128_cache), torch.device("cpu"),
                         torch.float32)
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    features = engine.core.features([audio])
    assert features.shape == (1, 128, 3000)
    result = engine.transcribe(audio, TranscribeOptions(language="en", word_timestamps=True,
                                                        temperature_fallback=False))
    assert isinstance(result.text, str) and result.duration > 2.5
    for segment in result.segments:
        assert 0 <= segment.start <= segment.end <= result.duration
