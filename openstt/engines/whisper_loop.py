"""Whisper's long-form procedure, on the API side: openai/whisper's ``transcribe.py`` as a sans-IO
loop. 30-second windows decoded with timestamp tokens, seeking by the last timestamp (or the last
word) so segments carry absolute times, the previous window's text as context, and no-speech
detection; the decoding itself (and its temperature fallback) is the model side's
(``whisper_core``)."""

from __future__ import annotations

import functools
from collections.abc import Generator

import numpy as np

from openstt.audio import HOP, SAMPLE_RATE
from openstt.engines.base import MAX_PROMPT_CHARS, LoopState, TranscribeOptions
from openstt.engines.fallback import is_silent
from openstt.engines.whisper_tokens import BYTE_DECODER, FRAME_SECONDS, N_FRAMES, TIME_PRECISION, Detokenizer, TokenTable
from openstt.messages import AlignJob, DecodeResult, ModelFailure, WindowJob
from openstt.transcript import Segment, TokenLogprob, Word

TAIL_FRAMES = 100  # 1 s: the end of the audio after a window's last word, not decoded again
END_SLACK = 0.2  # seconds: words the alignment puts this near a window's end sit at its end


class WindowLoop(Detokenizer):
    """Whisper's long-form procedure over windows, free of model calls.

    ``run`` is a generator that yields a ``WindowJob`` or ``AlignJob`` whenever it needs the model
    and expects the answer sent back; it yields finished ``Segment``s in between. A driver supplies
    the answers (``engines.drivers``): in-process, or through the batching model service."""

    def __init__(self, tokenizer, table: TokenTable, multilingual: bool, max_prompt_tokens: int = 223):
        self.tokenizer, self.table, self.multilingual = tokenizer, table, multilingual
        self.max_prompt_tokens = max_prompt_tokens
        # keywords may take half the prompt; the previous text keeps the rest
        self.max_keyword_tokens = max_prompt_tokens // 2

    @functools.lru_cache(maxsize=256)  # a live session's every turn, a request's every chunk: once
    def keyword_tokens(self, keywords: tuple[str, ...]) -> list[int]:
        """Keywords as prompt text, like faster-whisper's ``hotwords``: one comma-separated list."""
        if not keywords:
            return []
        return self.tokenizer.encode(" " + ", ".join(keywords), add_special_tokens=False)

    @functools.lru_cache(maxsize=256)
    def prompt_tokens(self, prompt: str | None) -> list[int]:
        """The tail of ``prompt`` that fits the decoder's prompt, as tokens."""
        if not prompt or not prompt.strip():
            return []
        tokens = self.tokenizer.encode(" " + prompt.strip()[-MAX_PROMPT_CHARS:], add_special_tokens=False)
        return tokens[-self.max_prompt_tokens:]

    def logprob_entries(self, tokens: list[int], logprobs: list[float]) -> list[TokenLogprob]:
        out = []
        for tok, lp in zip(tokens, logprobs):
            if tok >= self.table.eot:
                continue
            raw = self.tokenizer.convert_ids_to_tokens(tok)
            # byte-level BPE: map the token's symbols back to the raw bytes it stands for
            data = [BYTE_DECODER[c] for c in raw if c in BYTE_DECODER] if raw else []
            out.append(TokenLogprob(token=self.tokenizer.decode([tok]), logprob=lp, bytes=data))
        return out

    def run(self, audio: np.ndarray, options: TranscribeOptions, state: LoopState
            ) -> Generator[WindowJob | AlignJob | Segment, DecodeResult | list[list[Word]] | None, None]:
        t = self.table
        n_frames = int(np.ceil(len(audio) / HOP))
        duration = len(audio) / SAMPLE_RATE
        seek = 0
        # (tokenised by the frontend's ``new_state`` when the request started, or cached)
        all_tokens: list[int] = list(state.prompt_tokens or self.prompt_tokens(options.prompt))
        prompt_reset_since = 0
        # Keywords lead every window's prompt (a context reset never drops them); the previous
        # text, the caller's prompt first, fills the rest of the budget.
        keywords = state.keyword_tokens or self.keyword_tokens(options.keywords)
        context_budget = self.max_prompt_tokens - len(keywords)
        next_id = 0
        while seek < n_frames:
            segment_size = min(N_FRAMES, n_frames - seek)
            time_offset = seek * FRAME_SECONDS
            chunk = audio[seek * HOP : (seek + segment_size) * HOP]
            if is_silent(chunk):
                seek += segment_size
                continue

            context = all_tokens[prompt_reset_since:][-context_budget:] if context_budget > 0 else []
            temperatures = options.temperatures()
            result = yield WindowJob(
                audio=chunk, prompt=keywords + context, task=options.task, language=state.language,
                temperature=temperatures[0], languages=list(options.languages), fallback=list(temperatures[1:]),
                compression_ratio_threshold=options.compression_ratio_threshold,
                logprob_threshold=options.logprob_threshold, no_speech_threshold=options.no_speech_threshold,
                beam_size=options.beam_size, speech_only=options.vad is not None,
                keep_encoding=options.word_timestamps)
            if result.error:
                raise ModelFailure(result.error, time_offset)
            state.language = state.language or result.language

            if result.no_speech_prob > options.no_speech_threshold and result.avg_logprob < options.logprob_threshold:
                seek += segment_size  # silence: nothing to say in this window
                continue

            window_seek = seek
            tokens = result.tokens
            is_ts = [tok >= t.timestamp_begin for tok in tokens]
            pieces: list[tuple[float, float, list[int], list[float]]] = []
            consecutive = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
            single_timestamp_ending = is_ts[-2:] == [False, True]
            if consecutive:
                slices = consecutive + ([len(tokens)] if single_timestamp_ending else [])
                last = 0
                for current in slices:
                    piece = tokens[last:current]
                    start = (piece[0] - t.timestamp_begin) * TIME_PRECISION
                    end = (piece[-1] - t.timestamp_begin) * TIME_PRECISION
                    pieces.append((time_offset + start, time_offset + end, piece, result.token_logprobs[last:current]))
                    last = current
                if single_timestamp_ending:
                    seek += segment_size
                else:  # resume at the last complete timestamp, re-decoding the unfinished tail
                    seek += int(round((tokens[last - 1] - t.timestamp_begin) * TIME_PRECISION / FRAME_SECONDS))
            else:
                end = segment_size * FRAME_SECONDS
                stamps = [tok for tok in tokens if tok >= t.timestamp_begin]
                if stamps and stamps[-1] != t.timestamp_begin:
                    end = (stamps[-1] - t.timestamp_begin) * TIME_PRECISION
                pieces.append((time_offset, time_offset + end, tokens, result.token_logprobs))
                seek += segment_size

            window: list[Segment] = []
            for start, end, piece, piece_logprobs in pieces:
                text = self.text_of(piece)
                start, end = min(start, duration), min(end, duration)
                if not text.strip() or end <= start:
                    continue
                window.append(Segment(
                    id=0, seek=window_seek, start=round(start, 3), end=round(end, 3), text=text, tokens=piece,
                    temperature=result.temperature, avg_logprob=result.avg_logprob,
                    compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
                    logprobs=self.logprob_entries(piece, piece_logprobs) if options.token_logprobs else [],
                ))
            if window and options.word_timestamps:
                words = yield AlignJob(audio=chunk, language=state.language, task=options.task,
                                       segment_tokens=[[tok for tok in s.tokens if tok < t.eot] for s in window],
                                       num_frames=segment_size)
                for segment, segment_words in zip(window, words):
                    segment.words = [Word(w.word, round(time_offset + w.start, 3), round(time_offset + w.end, 3))
                                     for w in segment_words]
                    if segment.words:  # bounds follow the words, as in Whisper's word-timestamp mode
                        segment.start, segment.end = segment.words[0].start, segment.words[-1].end
                # Text the alignment finds no audio for (every word 0 s long, pushed to the window's
                # end) was made up: after the last word of a real call, whisper-base added five
                # earlier lines at 29.98-29.98 s.
                window_end = time_offset + segment_size * FRAME_SECONDS - END_SLACK
                window = [s for s in window if not s.words or s.words[0].start < window_end
                          or any(w.end > w.start for w in s.words)]
                last_word = max((s.words[-1].end for s in window if s.words), default=None)
                if not single_timestamp_ending and consecutive and last_word is not None \
                        and last_word > seek * FRAME_SECONDS:
                    # As openai/whisper does: resume after the last word, not the last timestamp
                    # token. On a real phone call whisper-base stamped 30 s of speech 0-20 s, and
                    # resuming at 20 s transcribed its last 10 s twice (issue #26).
                    seek = min(int(round(last_word / FRAME_SECONDS)), window_seek + segment_size)
                    if n_frames - seek < TAIL_FRAMES:
                        # this window heard that tail and found no word in it; decoded alone, the
                        # last 0.16 s of that call gave a made-up "Okay." (issue #26)
                        seek = n_frames
            for segment in window:
                segment.id = next_id
                next_id += 1
                yield segment
            all_tokens.extend(tok for s in window for tok in s.tokens)
            if not options.condition_on_previous_text or result.temperature > 0.5:
                # a hot (likely bad) window must not poison the context of the next one
                prompt_reset_since = len(all_tokens)
