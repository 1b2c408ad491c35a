"""Whisper through transformers' ``WhisperForConditionalGeneration``.

Everything model-specific (mel bins, special tokens, language table, alignment heads) comes from
the checkpoint's own processor and generation config, so one class serves tiny through large-v3
and the distil models. Decoding is Whisper's reference procedure (``whisper_decoding``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from openstt.engines.base import Engine, TranscribeOptions, TranscriptionRun, UnsupportedRequest
from openstt.engines.whisper_decoding import N_FRAMES, TokenTable, WhisperDecoder
from openstt.engines.word_timing import CrossAttentionAligner

log = logging.getLogger(__name__)


class WhisperEngine(Engine):
    def __init__(self, spec, path: Path, device: torch.device, dtype: torch.dtype):
        super().__init__(spec)
        started = time.perf_counter()
        self.device, self.dtype = device, dtype
        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False)) and not spec.english_only
        self.table = TokenTable.from_model(self.processor.tokenizer, gen, self.model.config.vocab_size)
        self.decoder = WhisperDecoder(self.model, self.processor, self.table, device, dtype)
        self.aligner = CrossAttentionAligner(self.model, self.processor.tokenizer, self.table,
                                             getattr(gen, "alignment_heads", None) or [])
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "multilingual": self.multilingual, "mel_bins": self.model.config.num_mel_bins}

    def _check(self, options: TranscribeOptions) -> None:
        if self.multilingual:
            return
        if options.task == "translate":
            raise UnsupportedRequest(
                f"Model '{self.name}' is English-only and cannot translate; use a multilingual model.",
                param="model",
            )
        if options.language not in (None, "en"):
            raise UnsupportedRequest(
                f"Model '{self.name}' is English-only; language '{options.language}' is not supported.",
                param="language",
            )

    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        self._check(options)
        duration = len(audio) / 16000
        first_window = None
        language = options.language or "en"
        if self.multilingual and options.language is None:
            # Like Whisper, detect once from the first 30 s; keep that encoder pass for decoding.
            with self.decoder.lock, torch.inference_mode():
                features = self.decoder.features(audio[: N_FRAMES * 160])
                encoded = self.decoder.encode(features)
                language = self.decoder.detect_language(encoded)
            first_window = (features, encoded)
        sot_sequence = self.decoder.sot_sequence(language, options.task, self.multilingual)

        align = None
        if options.word_timestamps:
            def align(encoded, segments, num_frames):
                self.aligner(encoded, segments, num_frames, sot_sequence, language)

        segments = self.decoder.segments(audio, options, sot_sequence, first_window=first_window, align=align)
        return TranscriptionRun(language=language, duration=duration, segments=segments)
