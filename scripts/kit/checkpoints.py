"""Random-weight checkpoints with real architectures, for the code paths whose real weights cannot
be fetched here: Voxtral, and Whisper with 128 mel bins (large-v3's layout).

Real Voxtral weights (9 GB / 48 GB) are not obtainable in CI, so tests build a checkpoint with
Voxtral's architecture and a synthesized Tekken tokenizer (``tekken.json``: the real special-token
ranks — ``[AUDIO]`` = 24, ``[BEGIN_AUDIO]`` = 25, ``[TRANSCRIBE]`` = 34 — and a byte-level vocab).
Its output is noise: tests using it assert shapes, processor, decoding loop and response formats,
never words. ``TINY`` is for CPU tests; ``MINI_3B`` has Voxtral-Mini-3B-2507's real shapes (for a
GPU smoke test: ~4.7 B parameters).

``build_whisper`` makes a Whisper checkpoint of a given shape with the real tokenizer and generation
config of a real (smaller) snapshot: ``WHISPER_TOY`` (128 mel bins, tiny) for CPU tests,
``WHISPER_LARGE_V3`` (1.55 B parameters) for the GPU smoke test. Its words are noise too.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import torch

SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
           7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
           13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]",
           18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]"}
# tiktoken pattern of Mistral's Tekken tokenizers
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")

TINY = {"audio": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 32},
        "num_special": 100}
MINI_3B = {"audio": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                     "num_attention_heads": 20},
           "text": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 30, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128},
           "num_special": 1000, "vocab": 131072}


def _pieces(n: int):
    """``n`` distinct byte strings: every single byte, then byte pairs, then printable triples."""
    singles = [bytes([b]) for b in range(256)]
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    triples = (bytes([a, b, c]) for a in range(32, 127) for b in range(32, 127) for c in range(32, 127))
    for i, piece in enumerate(p for group in (singles, pairs, triples) for p in group):
        if i == n:
            return
        yield piece


def write_tekken(out: Path, num_special: int, vocab_size: int | None = None) -> int:
    """Write a v7 Tekken tokenizer with audio support; returns the model vocab size it implies."""
    specials = [{"rank": i, "token_str": SPECIAL.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                for i in range(num_special)]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(piece).decode(), "token_str": None}
             for r, piece in enumerate(_pieces((vocab_size or num_special + 256) - num_special))]
    tekken = {
        "config": {"pattern": PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": len(vocab) + num_special,
                   "default_num_special_tokens": num_special, "version": "v7"},
        "vocab": vocab, "special_tokens": specials, "version": 1, "type": "Tekken",
        "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0, "transcription_format": "instruct",
                  "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}},
    }
    (out / "tekken.json").write_text(json.dumps(tekken))
    return len(vocab) + num_special


def build_voxtral(out: Path, shape: dict = TINY, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  seed: int = 0) -> Path:
    """Save a random-weight Voxtral checkpoint of ``shape`` (plus its processor files) in ``out``."""
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    out.mkdir(parents=True, exist_ok=True)
    tokens = write_tekken(out, shape["num_special"], shape.get("vocab"))
    config = VoxtralConfig(
        audio_config={"num_mel_bins": 128, "max_source_positions": 1500, **shape["audio"]},
        text_config={"model_type": "llama", "vocab_size": tokens, "max_position_embeddings": 131072,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11, "rope_theta": 1e8, **shape["text"]},
        audio_token_id=24, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    with torch.device(device):
        model = VoxtralForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = 11
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out)
    return out


WHISPER_LARGE_V3 = {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
                    "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120,
                    "num_mel_bins": 128}
# openai/whisper-large-v3's generation_config.json
WHISPER_LARGE_V3_HEADS = [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]]
# large-v3's 128 mel bins at toy size: the CPU tests' checkpoint, and the GPU smoke test's --dry-run
WHISPER_TOY = {**WHISPER_LARGE_V3, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
               "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 128,
               "decoder_ffn_dim": 128}


def build_whisper(out: Path, tokenizer_dir: Path, shape: dict = WHISPER_TOY, *, dtype: torch.dtype = torch.float32,
                  device: str = "cpu", seed: int | None = 0) -> Path:
    """Save a random-weight Whisper checkpoint of ``shape`` in ``out``: ``tokenizer_dir``'s config
    (a real Whisper snapshot's) with ``shape`` over it, its tokenizer and generation config
    (alignment heads: large-v3's at its 32 decoder layers, else two of layer 1), and a 128-bin
    feature extractor. ``seed``: torch's, set before the weights are drawn (None: left as it is)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = json.loads((tokenizer_dir / "config.json").read_text()) | shape
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = WhisperForConditionalGeneration(WhisperConfig(**config)).to(dtype)
    model.save_pretrained(out)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    generation = json.loads((tokenizer_dir / "generation_config.json").read_text())
    generation["alignment_heads"] = WHISPER_LARGE_V3_HEADS if shape["decoder_layers"] == 32 else [[1, 0], [1, 1]]
    (out / "generation_config.json").write_text(json.dumps(generation))
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out)
    return out
