"""Whisper through transformers' ``WhisperForConditionalGeneration``.

Everything model-specific (mel bins, special tokens, language table, alignment heads) comes from
the checkpoint's own processor and generation config, so one class serves tiny through large-v3
and the distil models. Decoding is Whisper's reference procedure (``whisper_decoding``).
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

from openstt.device import Placement, quantize_int8
from openstt.engines.base import TranscribeOptions, UnsupportedRequest
from openstt.engines.jobs import InProcessEngine, LoopState
from openstt.engines.whisper_decoding import TokenTable, WhisperCore, WindowLoop
from openstt.engines.word_timing import CrossAttentionAligner


def check_request(name: str, multilingual: bool, options: TranscribeOptions) -> None:
    """Refuse what an English-only checkpoint cannot do, before any audio is decoded."""
    if multilingual:
        return
    if options.task == "translate":
        raise UnsupportedRequest(
            f"Model '{name}' is English-only and cannot translate; use a multilingual model.", param="model")
    if options.language not in (None, "en"):
        raise UnsupportedRequest(
            f"Model '{name}' is English-only; language '{options.language}' is not supported.", param="language")


class WhisperFrontend:
    """The request side of a Whisper model: tokenizer and procedure, no weights. The API process
    uses it to run transcriptions whose windows a (possibly remote) ``WhisperCore`` decodes."""

    supports_word_timestamps = True

    def __init__(self, spec, path: Path, processor=None, generation_config=None, vocab_size: int | None = None):
        """Reads the checkpoint's processor and configs at ``path`` unless the caller (the engine,
        which has them loaded already) passes them."""
        from transformers import AutoConfig

        self.spec = spec
        processor = processor or WhisperProcessor.from_pretrained(path)
        gen = generation_config or GenerationConfig.from_pretrained(path)
        vocab_size = vocab_size or AutoConfig.from_pretrained(path).vocab_size
        self.multilingual = bool(getattr(gen, "is_multilingual", False)) and not spec.english_only
        self.table = TokenTable.from_model(processor.tokenizer, gen, vocab_size)
        self.loop = WindowLoop(processor.tokenizer, self.table, self.multilingual)

    def check(self, options: TranscribeOptions) -> None:
        check_request(self.spec.name, self.multilingual, options)

    def new_state(self, options: TranscribeOptions) -> LoopState:
        return LoopState(language=options.language or (None if self.multilingual else "en"))


class WhisperEngine(InProcessEngine):
    def __init__(self, spec, path: Path, placement: Placement):
        super().__init__(spec)
        started = time.perf_counter()
        self.placement = placement
        device, dtype = self.device, self.dtype = placement.device, placement.dtype
        processor = WhisperProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=placement.attn_implementation).to(device).eval()
        if placement.quantize == "int8":
            self.model = quantize_int8(self.model)
        gen = self.model.generation_config
        self.frontend = WhisperFrontend(spec, path, processor, gen, self.model.config.vocab_size)
        self.multilingual, table = self.frontend.multilingual, self.frontend.table
        aligner = CrossAttentionAligner(self.model, processor.tokenizer, table,
                                        getattr(gen, "alignment_heads", None) or [])
        self.core = WhisperCore(self.model, processor, table, self.multilingual, device, dtype, aligner)
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "attention": self.placement.attn_implementation, "quantize": self.placement.quantize,
                "multilingual": self.multilingual, "mel_bins": self.model.config.num_mel_bins}
