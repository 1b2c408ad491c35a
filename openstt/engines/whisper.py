"""Whisper through transformers' ``WhisperForConditionalGeneration``.

Everything model-specific (mel bins, special tokens, language table) comes from the checkpoint's
own processor and generation config, so one class serves tiny through large-v3 and distil models.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from openstt.audio import SAMPLE_RATE
from openstt.catalog import ModelSpec
from openstt.engines.base import Engine, TranscribeOptions, Transcript, UnsupportedRequest

log = logging.getLogger(__name__)

WINDOW_SECONDS = 30


class WhisperEngine(Engine):
    def __init__(self, spec: ModelSpec, path: Path, device: torch.device, dtype: torch.dtype):
        super().__init__(spec)
        started = time.perf_counter()
        self.device, self.dtype = device, dtype
        self.processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False)) and not spec.english_only
        self._id_to_lang = {i: tok.strip("<|>") for tok, i in (getattr(gen, "lang_to_id", None) or {}).items()}
        # generate() is not re-entrant on one module instance; serialise per model.
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "multilingual": self.multilingual}

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

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcript:
        self._check(options)
        duration = len(audio) / SAMPLE_RATE
        long_form = duration > WINDOW_SECONDS
        # Short clips are padded to one 30 s window; longer ones keep every frame so that
        # generate() runs Whisper's sequential long-form decoding over them.
        features = self.processor.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
            truncation=not long_form, padding="longest" if long_form else "max_length",
            return_attention_mask=long_form,
        )
        kwargs: dict = {"input_features": features.input_features.to(self.device, self.dtype)}
        if long_form:
            kwargs.update(attention_mask=features.attention_mask.to(self.device), return_timestamps=True)
        if self.multilingual:
            kwargs.update(task=options.task, language=options.language)
        if options.prompt:
            kwargs["prompt_ids"] = torch.as_tensor(
                self.processor.get_prompt_ids(options.prompt), device=self.device
            )
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature)

        with self._lock, torch.inference_mode():
            language = options.language or self._detect_language(kwargs["input_features"])
            if self.multilingual and kwargs.get("language") is None:
                kwargs["language"] = language
            ids = self.model.generate(**kwargs)
        text = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
        return Transcript(text=text, language=language, duration=duration)

    def _detect_language(self, features: torch.Tensor) -> str:
        if not self.multilingual:
            return "en"
        token = self.model.detect_language(features[:, :, : WINDOW_SECONDS * 100])
        return self._id_to_lang.get(int(token[0]), "en")
