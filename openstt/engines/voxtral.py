"""Mistral's Voxtral through transformers' ``VoxtralForConditionalGeneration``.

Voxtral is an audio-LLM: a Whisper-style encoder feeding a Mistral decoder. Transcription uses
the processor's transcription-request template (``[TRANSCRIBE]`` mode, ``lang:xx`` when the
language is given); translation asks the same model in chat mode. It produces no timestamps, so
long audio is cut into chunks at quiet moments (``quiet_cuts``) and each chunk becomes
one segment: segment times come from the chunk boundaries, and word timestamps are not offered.

Like Whisper, a transcription is a sans-IO loop (``ChunkLoop``, which only needs the tokenizer)
plus a core holding the weights (``VoxtralCore``), so chunks of concurrent requests are batched by
the model service exactly as Whisper windows are.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
import zlib
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch

from openstt.audio import SAMPLE_RATE
from openstt.device import Placement, quantize_int8
from openstt.engines.base import TranscribeOptions, UnsupportedRequest
from openstt.transcript import Segment, TokenLogprob, Word
from openstt.engines.quiet_cuts import quiet_cuts
from openstt.engines.base import LoopState
from openstt.engines.drivers import InProcessEngine
from openstt.engines.fallback import compression_ratio, is_silent
from openstt.messages import AlignJob, DecodeResult, ModelFailure, WindowJob

log = logging.getLogger(__name__)

# Voxtral's encoder reads 30 s windows and the model was trained on up to ~30 minutes per
# request; 30 s chunks keep segment times useful for subtitles and batch like Whisper windows.
DEFAULT_CHUNK_SECONDS = 30.0
# Generation budget per chunk: fast speech is ~5 tokens/s; non-Latin scripts need more.
TEXT_TOKENS_PER_SECOND = 12
MIN_NEW_TOKENS = 32
TRANSLATE_INSTRUCTION = "Translate this audio into English. Reply with the translation only."
UNKNOWN_LANGUAGE = "unknown"  # Voxtral does not report the language it heard
_LANG_PREFIX = re.compile(r"^lang:([a-z]{2})")


def _wav_base64(audio: np.ndarray) -> str:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, audio, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


class VoxtralTokens:
    """Text side of a Voxtral checkpoint: token ids to text, logprob entries."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # transformers' MistralCommonBackend (tekken.json)
        self.eos = tokenizer.eos_token_id
        self._tekken = tokenizer.tokenizer.instruct_tokenizer.tokenizer

    def text_of(self, tokens: list[int]) -> str:
        return self._tekken.decode([t for t in tokens if not self._tekken.is_special(t)])

    def logprob_entries(self, tokens: list[int], logprobs: list[float]) -> list[TokenLogprob]:
        out = []
        for tok, lp in zip(tokens, logprobs):
            if self._tekken.is_special(tok):
                continue
            data = self._tekken.id_to_byte_piece(tok)
            out.append(TokenLogprob(token=data.decode("utf-8", errors="replace"), logprob=lp, bytes=list(data)))
        return out


class ChosenLogprobs:
    """A logits processor that records the log-probability of each token generate() picks.

    Keeping ``output_scores`` instead would hold a (batch x vocab) float32 tensor per step —
    for Voxtral's 131k vocabulary, 8 chunks of 400 tokens, 1.6 GB (then copied twice by
    ``compute_transition_scores``). This keeps one step's distribution and, at the next step,
    reads the token that was chosen from it."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, chosen[:, None])[:, 0])
            self.previous = None

    def finish(self, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """(batch, generated) logprobs of ``sequences``' generated part."""
        if sequences.shape[1] > prompt_len + len(self.steps):
            self._take(sequences[:, prompt_len + len(self.steps)])
        if not self.steps:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self.steps, dim=1).cpu()


class VoxtralCore:
    """The model side: batched generation over chunks of any requests. One batch at a time."""

    def __init__(self, model, processor, repo_id: str, device: torch.device, dtype: torch.dtype,
                 decoder: str = "eager"):
        self.model, self.processor, self.repo_id = model, processor, repo_id
        self.device, self.dtype = device, dtype
        # static/graphs: transformers' own static KV cache for the language model's generate (one
        # allocation per batch shape); graphs also lets generate compile its step on CUDA
        # (torch.compile "reduce-overhead": CUDA graphs). eager: the dynamic cache.
        self.cache = {"eager": {}, "static": {"cache_implementation": "static", "disable_compile": True},
                      "graphs": {"cache_implementation": "static"}}[decoder]
        self.tokens = VoxtralTokens(processor.tokenizer)
        self.pad = processor.tokenizer.pad_token_id
        self.lock = threading.Lock()
        self.batch_sizes: list[int] = []

    def inputs(self, jobs: list[WindowJob], task: str):
        """Token ids, attention mask and mel features for chunks that share a task."""
        if task == "translate":
            conversations = [[{"role": "user", "content": [
                {"type": "audio", "base64": _wav_base64(j.audio)},
                {"type": "text", "text": TRANSLATE_INSTRUCTION}]}] for j in jobs]
            batch = self.processor.apply_chat_template(conversations)
        else:
            batch = self.processor.apply_transcription_request(
                audio=[j.audio for j in jobs], language=[j.language for j in jobs], format=["wav"] * len(jobs),
                sampling_rate=SAMPLE_RATE, model_id=self.repo_id)
        batch = batch.to(self.device)
        batch["input_features"] = batch["input_features"].to(self.dtype)
        return batch

    def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        """Generate the text of each chunk; chunks with the same task and temperature share a pass."""
        results: list[DecodeResult | None] = [None] * len(jobs)
        groups: dict[tuple[str, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.task, job.temperature), []).append(i)
        with self.lock, torch.inference_mode():
            self.batch_sizes = (self.batch_sizes + [len(jobs)])[-1000:]
            for (task, temperature), indices in groups.items():
                for i, result in zip(indices, self._generate([jobs[i] for i in indices], task, temperature)):
                    results[i] = result
        return results  # type: ignore[return-value]

    def _generate(self, jobs: list[WindowJob], task: str, temperature: float) -> list[DecodeResult]:
        batch = self.inputs(jobs, task)
        longest = max(len(j.audio) for j in jobs) / SAMPLE_RATE
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        from transformers import LogitsProcessorList

        recorder = ChosenLogprobs()
        budget = int(longest * TEXT_TOKENS_PER_SECOND) + MIN_NEW_TOKENS
        # transformers samples from torch's global generator: seeded here by the batch's audio and the
        # temperature (as Whisper's rows are by theirs), so the same request gives the same text, and
        # restored after, so that nothing else's randomness depends on what was decoded before.
        with torch.random.fork_rng(devices=[]):
            if temperature > 0:
                torch.manual_seed(hash((*(zlib.crc32(np.ascontiguousarray(j.audio, dtype=np.float32).view(np.uint8))
                                          for j in jobs), temperature)) % 2**63)
            sequences = self.model.generate(**batch, max_new_tokens=budget, pad_token_id=self.pad,
                                            eos_token_id=self.tokens.eos,
                                            logits_processor=LogitsProcessorList([recorder]), **sampling,
                                            **self.cache)
        prompt_len = batch["input_ids"].shape[1]
        scores = recorder.finish(sequences, prompt_len)
        results = []
        for row, job in enumerate(jobs):
            generated = sequences[row, prompt_len:].tolist()
            n = generated.index(self.tokens.eos) if self.tokens.eos in generated else len(generated)
            tokens, logprobs = generated[:n], scores[row, :n].tolist()
            counted = scores[row, : min(n + 1, len(generated))]  # the end token counts, as in Whisper
            total = float(counted.sum())
            language = job.language or UNKNOWN_LANGUAGE
            text = self.tokens.text_of(tokens)
            if match := _LANG_PREFIX.match(text):  # some checkpoints announce the language they heard
                language = match.group(1)
            results.append(DecodeResult(
                tokens=tokens, token_logprobs=logprobs, sum_logprob=total,
                avg_logprob=total / max(len(counted), 1), no_speech_prob=0.0, temperature=temperature,
                language=language, compression_ratio=compression_ratio(text)))
        return results

    def align(self, job: AlignJob) -> list[list[Word]]:
        raise NotImplementedError("Voxtral does not provide word timestamps")


class ChunkLoop:
    """A Voxtral transcription over quiet-cut chunks, free of model calls (see ``jobs``).

    A chunk whose output compresses like a loop is decoded again at higher temperatures
    (Whisper's ladder, on compression ratio only: an LLM's average logprob is not calibrated
    against Whisper's threshold)."""

    def __init__(self, tokens: VoxtralTokens, chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
        self.tokens, self.chunk_seconds = tokens, chunk_seconds

    def run(self, audio: np.ndarray, options: TranscribeOptions, state: LoopState
            ) -> Generator[WindowJob | Segment, DecodeResult | None, None]:
        next_id = 0
        for start, end in quiet_cuts(audio, self.chunk_seconds):
            chunk = audio[start:end]
            if is_silent(chunk):
                continue
            result = None
            for temperature in options.temperatures():
                result = yield WindowJob(audio=chunk, prompt=[], task=options.task, language=options.language,
                                         temperature=temperature)
                if result.error:
                    raise ModelFailure(result.error, start / SAMPLE_RATE)
                if result.compression_ratio <= options.compression_ratio_threshold:
                    break
            assert result is not None
            if state.language in (None, UNKNOWN_LANGUAGE):
                state.language = result.language
            text = _LANG_PREFIX.sub("", self.tokens.text_of(result.tokens)).strip()
            if not text:
                continue
            yield Segment(
                # seek is in 10 ms frames, like Whisper's
                id=next_id, seek=start // (SAMPLE_RATE // 100), start=round(start / SAMPLE_RATE, 3),
                end=round(end / SAMPLE_RATE, 3),
                text=" " + text, tokens=result.tokens, temperature=result.temperature,
                avg_logprob=result.avg_logprob, compression_ratio=result.compression_ratio, no_speech_prob=0.0,
                logprobs=(self.tokens.logprob_entries(result.tokens, result.token_logprobs)
                          if options.token_logprobs else []),
            )
            next_id += 1


class VoxtralFrontend:
    """The request side of a Voxtral model: tokenizer and chunk loop, no weights."""

    supports_word_timestamps = False
    multilingual = True

    def __init__(self, spec, path: Path, chunk_seconds: float = DEFAULT_CHUNK_SECONDS, processor=None):
        from transformers import AutoTokenizer

        self.spec = spec
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path)
        self.loop = ChunkLoop(VoxtralTokens(tokenizer), chunk_seconds)

    def check(self, options: TranscribeOptions) -> None:
        """Voxtral's request template takes ISO 639-1 (two-letter) codes only; Whisper's table also
        has ``haw``, ``yue``, ``jw``... (word timestamps are refused by the API's capability check).
        Its template has no prompt slot and it does not report a detected language, so it cannot
        take keywords or a set of possible languages (a single one arrives as ``language``), and it
        decodes without beam search."""
        if options.beam_size > 1:
            raise UnsupportedRequest(f"Model '{self.spec.name}' does not decode with beam search; use a Whisper "
                                     "model or beam_size 1.", param="beam_size")
        if options.keywords:
            raise UnsupportedRequest(f"Model '{self.spec.name}' cannot take keywords; use a Whisper model.",
                                     param="keywords")
        if options.languages:
            raise UnsupportedRequest(f"Model '{self.spec.name}' cannot restrict detection to several languages; "
                                     "pass one language.", param="languages")
        if options.language is None or options.task == "translate":
            return
        from pydantic import TypeAdapter, ValidationError
        from pydantic_extra_types.language_code import LanguageAlpha2

        try:
            TypeAdapter(LanguageAlpha2).validate_python(options.language)
        except ValidationError:
            raise UnsupportedRequest(f"Model '{self.spec.name}' takes two-letter ISO 639-1 language codes; "
                                     f"'{options.language}' is not one.", param="language") from None

    def new_state(self, options: TranscribeOptions) -> LoopState:
        return LoopState(language=options.language or UNKNOWN_LANGUAGE)


class VoxtralEngine(InProcessEngine):
    def __init__(self, spec, path: Path, placement: Placement, chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
        from transformers import AutoProcessor, VoxtralForConditionalGeneration

        super().__init__(spec)
        started = time.perf_counter()
        self.placement = placement
        processor = AutoProcessor.from_pretrained(path)
        model = VoxtralForConditionalGeneration.from_pretrained(
            path, dtype=placement.dtype, attn_implementation=placement.attn_implementation).to(placement.device).eval()
        if placement.quantize == "int8":
            model = quantize_int8(model)
        self.model = model
        self.core = VoxtralCore(model, processor, spec.repo_id, placement.device, placement.dtype,
                                placement.decoder)
        self.frontend = VoxtralFrontend(spec, path, chunk_seconds, processor=processor)
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.placement.device),
                "dtype": str(self.placement.dtype).removeprefix("torch."),
                "attention": self.placement.attn_implementation, "quantize": self.placement.quantize,
                "mel_bins": self.model.config.audio_config.num_mel_bins,
                "chunk_seconds": self.frontend.loop.chunk_seconds}
