"""128-mel Whisper (large-v3 / large-v3-turbo / distil-large-v3 layout) through the whole stack.

No real 128-mel weights are obtainable here, so this builds a *tiny random-weight* checkpoint with
128 mel bins (and the real multilingual tokenizer and generation config of base) and installs it as
openai/whisper-large-v3. It asserts the code path — the feature extractor comes from the
checkpoint (128 bins, not a hard-coded 80), the encoder accepts it, the decoding loop, batching and
response formats work — not the words, which are noise from random weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import openai
import pytest
import torch

from openstt.audio import decode_audio
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions, load_engine
from openstt.hub import install_snapshot, resolve_model
from tests.conftest import Server, clip, free_port, server_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mel128_cache(base_model, tmp_path_factory) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    out = tmp_path_factory.mktemp("mel128")
    base_config = json.loads((base_model / "config.json").read_text())
    config = WhisperConfig(**{**base_config, "num_mel_bins": 128, "d_model": 64, "encoder_layers": 2,
                              "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                              "encoder_ffn_dim": 128, "decoder_ffn_dim": 128})
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    generation = json.loads((base_model / "generation_config.json").read_text())
    generation["alignment_heads"] = [[1, 0], [1, 1]]
    (out / "generation_config.json").write_text(json.dumps(generation))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_model / name, out / name)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out)
    cache = tmp_path_factory.mktemp("hf-mel128") / "hub"
    install_snapshot(out, "openai/whisper-large-v3", cache=cache)
    return cache


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


def test_served_end_to_end(mel128_cache, tmp_path):
    port = free_port()
    env = server_env(mel128_cache, tmp_path, OPEN_STT_MODELS="whisper-large-v3")
    cli = str(Path(sys.executable).with_name("open-stt-server"))
    srv = Server([cli, "--port", str(port)], env, port, tmp_path / "mel128.log")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0,
                               _strict_response_validation=True)
        r = client.audio.transcriptions.create(model="whisper-1", file=clip("en/quick_brown_fox"),
                                               response_format="verbose_json", language="en",
                                               timestamp_granularities=["word", "segment"],
                                               temperature=1.0)  # the top of the ladder: one pass
        assert r.duration > 2.5 and r.language == "english" and isinstance(r.text, str)
        srt = client.audio.transcriptions.create(model="whisper-large-v3", file=clip("en/hello_world"),
                                                 response_format="srt", temperature=1.0)
        assert isinstance(srt, str)
    finally:
        assert srv.stop() == 0
    assert "'mel_bins': 128" in srv.log.read_text()
