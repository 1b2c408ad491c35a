"""Whisper through transformers' ``WhisperForConditionalGeneration``.

Everything model-specific (mel bins, special tokens, language table, alignment heads) comes from
the checkpoint's own processor and generation config, so one class serves tiny through large-v3
and the distil models. Decoding is Whisper's reference procedure (``whisper_tokens``, ``whisper_core``,
``whisper_loop``).
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

from openstt.device import Placement, quantize_int8
from openstt.engines.base import TranscribeOptions, UnsupportedRequest
from openstt.engines.base import LoopState
from openstt.engines.drivers import InProcessEngine
from openstt.engines.whisper_core import WhisperCore
from openstt.engines.whisper_loop import WindowLoop
from openstt.engines.whisper_tokens import TokenTable
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
    if options.languages and "en" not in options.languages:
        raise UnsupportedRequest(f"Model '{name}' is English-only; none of languages {', '.join(options.languages)} "
                                 "is supported.", param="languages")


class WhisperFrontend:
    """The request side of a Whisper model: tokenizer and procedure, no weights. The API process
    uses it to run transcriptions whose windows a (possibly remote) ``WhisperCore`` decodes."""

    supports_word_timestamps = True

    def __init__(self, spec, path: Path, processor=None, generation_config=None, config=None):
        """Reads the checkpoint's processor and configs at ``path`` unless the caller (the engine,
        which has them loaded already) passes them."""
        from transformers import AutoConfig

        self.spec = spec
        processor = processor or WhisperProcessor.from_pretrained(path)
        gen = generation_config or GenerationConfig.from_pretrained(path)
        config = config or AutoConfig.from_pretrained(path)
        self.multilingual = bool(getattr(gen, "is_multilingual", False)) and not spec.english_only
        self.table = TokenTable.from_model(processor.tokenizer, gen, config.vocab_size)
        # the prompt may fill half the decoder's context, as in openai/whisper
        self.loop = WindowLoop(processor.tokenizer, self.table, self.multilingual,
                               max_prompt_tokens=config.max_target_positions // 2 - 1)

    def check(self, options: TranscribeOptions) -> None:
        check_request(self.spec.name, self.multilingual, options)
        unknown = [c for c in options.languages if self.multilingual and c not in self.table.lang_to_id]
        if unknown:
            raise UnsupportedRequest(f"Model '{self.spec.name}' does not know language(s) {', '.join(unknown)}.",
                                     param="languages")
        if options.keywords:
            used, budget = len(self.loop.keyword_tokens(options.keywords)), self.loop.max_keyword_tokens
            if used > budget:
                raise UnsupportedRequest(f"keywords take {used} tokens; at most {budget} fit in the model's "
                                         "prompt. Send fewer or shorter keywords.", param="keywords")

    def new_state(self, options: TranscribeOptions) -> LoopState:
        return LoopState(language=options.language or (None if self.multilingual else "en"),
                         prompt_tokens=self.loop.prompt_tokens(options.prompt),
                         keyword_tokens=self.loop.keyword_tokens(options.keywords))


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
        self.frontend = WhisperFrontend(spec, path, processor, gen, self.model.config)
        self.multilingual, table = self.frontend.multilingual, self.frontend.table
        aligner = CrossAttentionAligner(self.model, processor.tokenizer, table,
                                        getattr(gen, "alignment_heads", None) or [])
        self.core = WhisperCore(self.model, processor, table, self.multilingual, device, dtype, aligner,
                                placement.decoder)
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "attention": self.placement.attn_implementation, "quantize": self.placement.quantize,
                "decoder": self.placement.decoder, "multilingual": self.multilingual, "mel_bins": self.model.config.num_mel_bins}
