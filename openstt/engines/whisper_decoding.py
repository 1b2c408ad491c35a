"""Whisper's own decoding procedure on transformers' model modules.

A port of openai/whisper's ``decoding.py`` + ``transcribe.py`` (the reference behaviour every
Whisper server is judged against): 30-second windows decoded with timestamp tokens, seeking by the
last timestamp so segments carry absolute times, the previous window's text as context, the
temperature fallback ladder (compression ratio / average logprob) and no-speech detection.
transformers provides the weights, the encoder and a KV-cached decoder step.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
import zlib
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from openstt.audio import SAMPLE_RATE
from openstt.engines.base import MAX_PROMPT_CHARS, TranscribeOptions
from openstt.transcript import Segment, TokenLogprob, Word
from openstt.engines.base import LoopState
from openstt.engines.fallback import compression_ratio, is_silent, needs_fallback, settle
from openstt.messages import AlignJob, DecodeResult, ModelFailure, WindowJob

HOP_LENGTH = 160
N_FRAMES = 3000  # mel frames in one 30 s window
FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE  # 0.01
TIME_PRECISION = 0.02  # seconds per timestamp token
BEST_OF = 5  # samples per window when decoding at temperature > 0
MAX_INITIAL_TIMESTAMP_INDEX = 50  # the first timestamp is at most 1.0 s
# Sampled tokens a window may take: Whisper's 224 for a full window, fewer for a short one. Speech
# carries at most ~10 tokens a second (fast Mandarin; English ~5, timestamps included), so a
# window that runs past 32 + 12 per second is a loop. Without this a 1 s clip whose prompt makes
# Whisper loop (223 tokens of "1111") decoded 224 tokens at each of six temperatures: ~35 s of CPU.
TOKENS_PER_SECOND, TOKENS_BASE = 12, 32
TAIL_FRAMES = 100  # 1 s: the end of the audio after a window's last word, not decoded again
END_SLACK = 0.2  # seconds: words the alignment puts this near a window's end sit at its end


@dataclass
class TokenTable:
    """The special token ids of one checkpoint, read from its tokenizer and generation config."""

    eot: int
    sot: int
    sot_prev: int
    no_timestamps: int
    timestamp_begin: int
    no_speech: int | None
    transcribe: int | None
    translate: int | None
    lang_to_id: dict[str, int]  # "en" -> 50259
    suppress: list[int]
    begin_suppress: list[int]
    vocab_size: int

    @classmethod
    def from_model(cls, tokenizer, generation_config, vocab_size: int) -> TokenTable:
        def tid(token: str) -> int | None:
            value = tokenizer.convert_tokens_to_ids(token)
            return value if isinstance(value, int) and value != tokenizer.unk_token_id else None

        no_timestamps = generation_config.no_timestamps_token_id
        lang_to_id = {t.strip("<|>"): i for t, i in (getattr(generation_config, "lang_to_id", None) or {}).items()}
        specials = [tid(t) for t in ("<|transcribe|>", "<|translate|>", "<|startoftranscript|>", "<|startofprev|>",
                                     "<|startoflm|>", "<|nospeech|>", "<|nocaptions|>")]
        suppress = sorted(set(generation_config.suppress_tokens or []) | {s for s in specials if s is not None})
        return cls(
            eot=generation_config.eos_token_id, sot=generation_config.decoder_start_token_id,
            sot_prev=generation_config.prev_sot_token_id, no_timestamps=no_timestamps,
            timestamp_begin=no_timestamps + 1, no_speech=tid("<|nospeech|>") or tid("<|nocaptions|>"),
            transcribe=tid("<|transcribe|>"), translate=tid("<|translate|>"), lang_to_id=lang_to_id,
            suppress=suppress, begin_suppress=list(generation_config.begin_suppress_tokens or []),
            vocab_size=vocab_size,
        )


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: printable symbol -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


_BYTE_DECODER = _byte_decoder()


class Detokenizer:
    """``text_of`` for the model side and the loop alike (both have a ``tokenizer`` and a ``table``)."""

    tokenizer: object
    table: TokenTable

    def text_of(self, tokens: list[int]) -> str:
        """The text of ``tokens``, timestamps and other special tokens left out."""
        return self.tokenizer.decode([tok for tok in tokens if tok < self.table.eot])


# Encoder outputs kept for word timing: a window's alignment follows its decoding, so only the
# windows of the batches in flight wait here (tiny: 2.3 MB each, large-v3: 7.7 MB in float32).
KEPT_ENCODINGS = 16


def _digest(audio: np.ndarray) -> bytes:
    data = np.ascontiguousarray(audio, dtype=np.float32)
    return hashlib.blake2b(data.view(np.uint8), digest_size=16).digest() + len(data).to_bytes(8, "little")


class WhisperCore(Detokenizer):
    """The model side: batched encoder + KV-cached decoder over windows of any requests.

    Thread-safe: one batch runs at a time per model."""

    def __init__(self, model, processor, table: TokenTable, multilingual: bool, device: torch.device,
                 dtype: torch.dtype, aligner=None):
        self.model, self.processor, self.table = model, processor, table
        self.tokenizer = processor.tokenizer
        self.multilingual = multilingual
        self.device, self.dtype = device, dtype
        self.n_text_ctx = model.config.max_target_positions
        self.aligner = aligner
        self.lock = threading.Lock()
        # encoder outputs of decoded windows whose words are to be timed next, by audio digest
        self._encodings: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and the debug log
        self.decoder_rows: collections.deque[int] = collections.deque(maxlen=4096)  # rows per decoder step

    def _keep(self, audio: np.ndarray, encoded: torch.Tensor) -> None:
        """Keep a window's encoder output for its alignment (a copy: not the whole batch's tensor)."""
        self._encodings[_digest(audio)] = encoded.clone()
        while len(self._encodings) > KEPT_ENCODINGS:  # windows whose alignment never came (no text)
            self._encodings.popitem(last=False)

    def features(self, chunks: list[np.ndarray]) -> torch.Tensor:
        """Log-mel of each chunk (at most 30 s), padded to full windows: (batch, mels, 3000)."""
        out = self.processor.feature_extractor(chunks, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return out.input_features.to(self.device, self.dtype)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.encoder(features).last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.proj_out(hidden).float()

    def sot_sequence(self, language: str, task: str) -> list[int]:
        t = self.table
        if not self.multilingual:
            return [t.sot]
        return [t.sot, t.lang_to_id[language], t.translate if task == "translate" else t.transcribe]

    def detect_languages(self, encoded: torch.Tensor, candidates: list[list[str]] | None = None) -> list[str]:
        """Most likely language of each window, from the logits after <|startoftranscript|>; a
        row's ``candidates`` (``languages[]``), when given, are the only languages it may pick."""
        codes = list(self.table.lang_to_id)
        ids = torch.tensor([self.table.lang_to_id[c] for c in codes], device=self.device)
        tokens = torch.full((encoded.shape[0], 1), self.table.sot, device=self.device)
        hidden = self.model.model.decoder(input_ids=tokens, encoder_hidden_states=encoded).last_hidden_state
        scores = self._logits(hidden[:, -1])[:, ids]
        if candidates and any(candidates):
            allowed = torch.tensor([[not row or c in row for c in codes] for row in candidates], device=self.device)
            scores = scores.masked_fill(~allowed, -np.inf)
        best = scores.argmax(dim=-1)
        return [codes[int(i)] for i in best]

    def _apply_rules(self, logits: torch.Tensor, tokens: torch.Tensor, sample_begin: int) -> None:
        """Whisper's logit filters: suppressed tokens, blank start, and the timestamp grammar.

        Written as whole-batch tensor operations: a per-row loop reading token values costs a
        device synchronisation per row and step, which dominated decoding on a GPU."""
        t = self.table
        ts = t.timestamp_begin
        step = tokens.shape[1] - sample_begin
        if step == 0:
            logits[:, t.begin_suppress] = -np.inf
        logits[:, t.suppress] = -np.inf
        logits[:, t.no_timestamps] = -np.inf
        columns = torch.arange(logits.shape[1], device=logits.device)
        is_ts_column = columns >= ts
        if step > 0:
            seq = tokens[:, sample_begin:]
            last_was_ts = seq[:, -1] >= ts
            penultimate_was_ts = seq[:, -2] >= ts if step >= 2 else torch.ones_like(last_was_ts)
            # a pair closed a segment: text must follow; an opening timestamp was just closed by
            # text: a timestamp or eot next
            closed = (last_was_ts & penultimate_was_ts)[:, None] & is_ts_column
            opened = (last_was_ts & ~penultimate_was_ts)[:, None] & (columns < t.eot)
            # timestamps never go backwards (an opened pair may repeat its last stamp); they only
            # increase, so the last one is the largest
            last_stamp = torch.where(seq >= ts, seq, -1).amax(dim=1)
            bound = torch.where(last_was_ts & ~penultimate_was_ts, last_stamp, last_stamp + 1)
            backwards = ((last_stamp >= ts)[:, None] & is_ts_column & (columns < bound[:, None]))
            logits.masked_fill_(closed | opened | backwards, -np.inf)
        else:
            logits[:, :ts] = -np.inf  # every window starts with a timestamp
            logits[:, ts + MAX_INITIAL_TIMESTAMP_INDEX + 1 :] = -np.inf
        # when all timestamps together are likelier than any single text token, emit a timestamp
        logprobs = torch.log_softmax(logits, dim=-1)
        ts_logprob = torch.logsumexp(logprobs[:, ts:], dim=-1)
        text_max = logprobs[:, :ts].max(dim=-1).values
        logits.masked_fill_((ts_logprob > text_max)[:, None] & ~is_ts_column, -np.inf)

    def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        """Decode many windows (from one or many requests) in one encoder and one decoder pass.

        A window whose result looks like a loop or garbage is decoded again down its fallback
        ladder (``job.fallback``) here, on the same encoder output: its audio crosses to the
        model service and through the encoder once, and the retries of a batch run together."""
        with self.lock, torch.inference_mode():
            self.batch_sizes = (self.batch_sizes + [len(jobs)])[-1000:]
            encoded = self.encode(self.features([j.audio for j in jobs]))
            for i, job in enumerate(jobs):
                if job.keep_encoding:
                    self._keep(job.audio, encoded[i:i + 1])
            languages = [j.language or ("en" if not self.multilingual else None) for j in jobs]
            unknown = [i for i, lang in enumerate(languages) if lang is None]
            if unknown:
                candidates = [[c for c in jobs[i].languages if c in self.table.lang_to_id] for i in unknown]
                for i, lang in zip(unknown, self.detect_languages(encoded[unknown], candidates)):
                    languages[i] = lang
            attempts = [[r] for r in self._decode_rows(encoded, jobs, languages, [j.temperature for j in jobs])]
            pending = [i for i, job in enumerate(jobs) if needs_fallback(attempts[i][-1], job)]
            level = 0
            while retry := [i for i in pending if level < len(jobs[i].fallback)]:
                results = self._decode_rows(encoded[retry], [jobs[i] for i in retry], [languages[i] for i in retry],
                                            [jobs[i].fallback[level] for i in retry])
                for i, result in zip(retry, results):
                    attempts[i].append(result)
                pending = [i for i in retry if needs_fallback(attempts[i][-1], jobs[i])]
                level += 1
        return [settle(tried, job) for tried, job in zip(attempts, jobs)]

    def _decode_rows(self, encoded: torch.Tensor, jobs: list[WindowJob], languages: list[str],
                     temperatures: list[float]) -> list[DecodeResult]:
        """One decoding pass over ``jobs`` at the given temperatures: greedy at 0 (beam search at 0
        for a job with ``beam_size`` > 1), else the best of ``BEST_OF`` samples. Rows that have
        emitted end-of-text leave the batch; a beam job's rows leave together once it has
        ``beam_size`` finished hypotheses.

        Beam search is openai/whisper's ``BeamSearchDecoder`` (patience 1): each step a job's
        ``beam_size`` rows are expanded over the vocabulary, the candidates ranked by cumulative
        logprob; those ending in eot become finished hypotheses, the best ``beam_size`` others the
        next beams (the KV cache rows follow them). The kept hypothesis is the best by
        ``sum_logprob / length`` (``MaximumLikelihoodRanker`` without length penalty)."""
        t = self.table
        rows: list[int] = []  # job index of each row; sampling jobs get BEST_OF rows, beam jobs beam_size
        initials: list[list[int]] = []
        beam_of: dict[int, int] = {}  # job -> beam size, for the jobs decoded by beam search
        first: dict[int, int] = {}  # job -> its first row (a job's rows are contiguous)
        for j, job in enumerate(jobs):
            prompt = job.prompt[-(self.n_text_ctx // 2 - 1):]
            initial = ([t.sot_prev] + prompt if prompt else []) + self.sot_sequence(languages[j], job.task)
            if temperatures[j] > 0:
                count = BEST_OF
            elif job.beam_size > 1:
                count = beam_of[j] = job.beam_size
            else:
                count = 1
            first[j] = len(rows)
            for _ in range(count):
                rows.append(j)
                initials.append(initial)
        n = len(rows)
        width = max(len(i) for i in initials)
        # left-pad to a common length so every row samples from the same column on
        tokens = torch.tensor([[t.eot] * (width - len(i)) + i for i in initials], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in initials], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        sot_index = torch.tensor([width - len(i) + i.index(t.sot) for i in initials], device=self.device)
        encoder_states = encoded[torch.tensor(rows, device=self.device)]
        row_temperature = [temperatures[j] for j in rows]
        # A sampled row draws from a generator of its own, seeded by its window's audio (so the same
        # file always gives the same transcript), its place among the window's samples (a job's rows
        # are contiguous) and the temperature: not by its place in the batch, so a window decodes the
        # same way whatever it is batched with. Greedy windows never pay for the checksum. (Tuples of
        # ints and floats hash the same in every process; PYTHONHASHSEED only salts str and bytes.)
        seeds = {j: zlib.crc32(np.ascontiguousarray(jobs[j].audio, dtype=np.float32).view(np.uint8))
                 for j in set(rows) if temperatures[j] > 0}
        generators = {k: torch.Generator(device=self.device).manual_seed(
                          hash((seeds[j], k - rows.index(j), row_temperature[k])) % 2**63)
                      for k, j in enumerate(rows) if row_temperature[k] > 0}
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        alive = torch.arange(n, device=self.device)  # rows still decoding; the batch shrinks as rows end
        alive_rows = list(range(n))
        sum_logprobs = torch.zeros(n, device=self.device)
        for j, size in beam_of.items():  # a beam job's rows start alike: only its first expands at step 0
            sum_logprobs[first[j] + 1 : first[j] + size] = -np.inf
        history = torch.zeros((n, 0), device=self.device)  # logprob of each row's tokens (0 once ended)
        # each beam job's finished hypotheses: (sum_logprob incl. eot, tokens, their logprobs), on the device
        finished: dict[int, list[tuple[float, torch.Tensor, torch.Tensor]]] = {j: [] for j in beam_of}
        open_beams = sorted(beam_of)  # beam jobs still decoding
        beam_layout = self._beam_layout(open_beams, beam_of, first, alive_rows)
        no_speech = torch.zeros(n)
        inputs, step_positions = tokens, positions
        longest = max(len(job.audio) for job in jobs) / SAMPLE_RATE
        max_len = min(self.n_text_ctx, width + min(self.n_text_ctx // 2, TOKENS_BASE + int(TOKENS_PER_SECOND * longest)))
        while tokens.shape[1] < max_len:
            self.decoder_rows.append(len(alive_rows))
            hidden = self.model.model.decoder(input_ids=inputs, attention_mask=mask, position_ids=step_positions,
                                              encoder_hidden_states=encoder_states, cache=cache,
                                              use_cache=True).last_hidden_state
            if inputs is tokens and t.no_speech is not None:
                at_sot = hidden[torch.arange(n), sot_index]
                no_speech = torch.softmax(self._logits(at_sot), dim=-1)[:, t.no_speech].cpu()
            logits = self._logits(hidden[:, -1])
            self._apply_rules(logits, tokens[alive], width)
            logprobs = torch.log_softmax(logits, dim=-1)
            next_tokens = logits.argmax(dim=-1)
            for pos, k in enumerate(alive_rows):
                if k in generators:  # Gumbel-max: a sample of softmax(logits / T) from the row's own generator
                    u = torch.rand(logits.shape[1], generator=generators[k], device=self.device).clamp_(1e-10, 1.0)
                    next_tokens[pos] = (logits[pos] / row_temperature[k] - torch.log(-torch.log(u))).argmax()
            current = logprobs[torch.arange(len(alive_rows)), next_tokens]
            source = None  # with beams: the row (alive position) each row continues from
            if beam_layout:
                source, beam_sums, ended = self._beam_step(beam_layout, logprobs, sum_logprobs[alive], next_tokens,
                                                            current, finished, beam_of, first, tokens, history, width)
            stay = next_tokens != t.eot  # a beam row's token never is: its job leaves once complete
            sum_logprobs[alive] += current
            if source is not None:
                sum_logprobs[alive[beam_sums[0]]] = beam_sums[1]  # cumulative logprob of the beam each row now holds
                order = torch.arange(n, device=self.device)
                order[alive] = alive[source]
                tokens, history = tokens[order], history[order]
                cache.self_attention_cache.reorder_cache(source)  # cross-attention: a beam job's rows are alike
                if ended:
                    open_beams = [j for j in open_beams if j not in ended]
                    stay[torch.tensor([p for p, k in enumerate(alive_rows) if rows[k] in ended],
                                      device=self.device)] = False
            history = torch.cat([history, torch.zeros(n, device=self.device).index_put_((alive,), current)[:, None]],
                                dim=1)
            column = torch.full((n,), t.eot, device=self.device).index_put_((alive,), next_tokens)
            tokens = torch.cat([tokens, column[:, None]], dim=1)
            keep = stay.nonzero().flatten()
            if len(keep) == 0:
                break
            if len(keep) < len(alive_rows):  # drop the ended rows from the cache and every per-row input
                cache.batch_select_indices(keep)
                alive, encoder_states, mask = alive[keep], encoder_states[keep], mask[keep]
                next_tokens, step_positions = next_tokens[keep], step_positions[keep]
                alive_rows = alive.tolist()
                beam_layout = self._beam_layout(open_beams, beam_of, first, alive_rows)
            inputs = next_tokens[:, None]
            mask = torch.cat([mask, torch.ones((len(alive_rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            step_positions = step_positions[:, -1:] + 1

        best: dict[int, DecodeResult] = {}
        all_tokens = tokens[:, width:].tolist()  # one transfer for the whole batch
        logprob_rows = history.tolist()
        sums, no_speech_probs = sum_logprobs.tolist(), no_speech.tolist()
        for k, j in enumerate(rows):
            if j in beam_of:
                continue
            seq = all_tokens[k]
            ended = t.eot in seq
            seq = seq[: seq.index(t.eot)] if ended else seq
            count = len(seq) + (1 if ended else 0)  # Whisper averages over the sampled tokens incl. eot
            candidate = DecodeResult(
                tokens=seq, token_logprobs=logprob_rows[k][: len(seq)], sum_logprob=sums[k],
                avg_logprob=sums[k] / max(count, 1), no_speech_prob=no_speech_probs[k],
                temperature=temperatures[j], language=languages[j], truncated=not ended,
            )
            score = candidate.sum_logprob / max(len(seq) + 1, 1)
            if j not in best or score > best[j].sum_logprob / max(len(best[j].tokens) + 1, 1):
                best[j] = candidate
        for j, size in beam_of.items():
            # finished hypotheses first; at the length limit, the likeliest unfinished beams fill up
            # to the beam size (as openai/whisper's ``finalize``)
            hypotheses = [(score, len(seq), seq, lps, True) for score, seq, lps in finished[j]]
            unfinished = sorted(range(first[j], first[j] + size), key=lambda k: sums[k], reverse=True)
            hypotheses += [(sums[k], len(all_tokens[k]), all_tokens[k], logprob_rows[k][: len(all_tokens[k])], False)
                           for k in unfinished[: max(size - len(hypotheses), 0)]]
            score, length, seq, token_logprobs, ended = max(hypotheses, key=lambda h: h[0] / max(h[1], 1))
            if isinstance(seq, torch.Tensor):
                seq, token_logprobs = seq.tolist(), token_logprobs.tolist()
            best[j] = DecodeResult(
                tokens=seq, token_logprobs=token_logprobs, sum_logprob=score,
                avg_logprob=score / max(length + (1 if ended else 0), 1), no_speech_prob=no_speech_probs[first[j]],
                temperature=temperatures[j], language=languages[j], truncated=not ended,
            )
        results = [best[j] for j in range(len(jobs))]
        for r in results:
            r.compression_ratio = compression_ratio(self.text_of(r.tokens))
        return results

    def _beam_layout(self, open_beams: list[int], beam_of: dict[int, int], first: dict[int, int],
                     alive_rows: list[int]) -> list[tuple[int, list[int], torch.Tensor]]:
        """The still-decoding beam jobs grouped by beam size: (size, jobs, their rows' places in the
        batch as a (jobs, size) tensor). A job's rows are contiguous and leave the batch together."""
        place = {k: p for p, k in enumerate(alive_rows)}
        by_size: dict[int, list[int]] = {}
        for j in open_beams:
            by_size.setdefault(beam_of[j], []).append(j)
        return [(size, js, torch.tensor([[place[first[j]] + b for b in range(size)] for j in js], device=self.device))
                for size, js in by_size.items()]

    def _beam_step(self, layout, logprobs: torch.Tensor, sums: torch.Tensor, next_tokens: torch.Tensor,
                   current: torch.Tensor, finished: dict[int, list], beam_of: dict[int, int], first: dict[int, int],
                   tokens: torch.Tensor, history: torch.Tensor, width: int):
        """One beam-search step for every beam job of the batch, in place on ``next_tokens`` and
        ``current`` (the token and its logprob each row appends). Returns the alive position each
        row continues from, (rows, cumulative logprobs) of the new beams, and the jobs completed.

        On the device: the 2 x size best candidates of each job over its rows x vocabulary (at
        most ``size`` end in eot, one per row, so the best ``size`` others are among them). One
        transfer brings them here to collect the finished hypotheses, as openai/whisper does: the
        eot candidates ranked above the last kept beam, until the job has ``size`` of them."""
        t = self.table
        vocab = logprobs.shape[1]
        source = torch.arange(len(sums), device=self.device)
        places, values, reports = [], [], []
        for size, _, place in layout:
            candidates = (sums[place][..., None] + logprobs[place]).flatten(1)  # (jobs, size * vocab)
            top, index = candidates.topk(2 * size, dim=1)
            beam, token = index // vocab, index % vocab
            # the first `size` candidates not ending in eot, in rank order (a stable sort keeps it)
            kept = torch.sort((token == t.eot).int(), dim=1, stable=True).indices[:, :size]
            origin = place.gather(1, beam.gather(1, kept)).flatten()
            chosen = token.gather(1, kept).flatten()
            target = place.flatten()
            source[target] = origin
            next_tokens[target] = chosen
            current[target] = logprobs[origin, chosen]
            places.append(target)
            values.append(top.gather(1, kept).flatten())
            reports.append(torch.stack([top, beam.to(top.dtype), token.to(top.dtype)]).flatten())
        report = torch.cat(reports).tolist()  # the one transfer per step beam search needs
        ended: set[int] = set()
        offset = 0
        for size, js, _ in layout:
            span = len(js) * 2 * size
            top, beam, token = (report[offset + i * span : offset + (i + 1) * span] for i in range(3))
            offset += 3 * span
            for g, j in enumerate(js):
                done = finished[j]
                kept = 0
                for r in range(g * 2 * size, (g + 1) * 2 * size):
                    if int(token[r]) != t.eot:
                        kept += 1
                        if kept == size:
                            break
                    elif len(done) < size and top[r] > -np.inf:
                        row = first[j] + int(beam[r])  # rows keep their place in ``tokens`` and ``history``
                        done.append((top[r], tokens[row, width:].clone(), history[row].clone()))
                if len(done) >= size:
                    ended.add(j)
        return source, (torch.cat(places), torch.cat(values)), ended

    def align(self, job: AlignJob) -> list[list[Word]]:
        """Word timings (relative to the window start) for each segment of a decoded window."""
        with self.lock, torch.inference_mode():
            encoded = self._encodings.pop(_digest(job.audio), None)
            if encoded is None:  # decoded by another model service, or evicted
                encoded = self.encode(self.features([job.audio]))
            return self.aligner(encoded, job.segment_tokens, job.num_frames,
                                self.sot_sequence(job.language, job.task), job.language)


class WindowLoop(Detokenizer):
    """Whisper's long-form procedure over windows, free of model calls.

    ``run`` is a generator that yields a ``WindowJob`` or ``AlignJob`` whenever it needs the model
    and expects the answer sent back; it yields finished ``Segment``s in between. A driver supplies
    the answers: in-process (``drive``), or through the batching model service (``adrive``)."""

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
            data = [_BYTE_DECODER[c] for c in raw if c in _BYTE_DECODER] if raw else []
            out.append(TokenLogprob(token=self.tokenizer.decode([tok]), logprob=lp, bytes=data))
        return out

    def run(self, audio: np.ndarray, options: TranscribeOptions, state: LoopState
            ) -> Generator[WindowJob | AlignJob | Segment, DecodeResult | list[list[Word]] | None, None]:
        t = self.table
        n_frames = int(np.ceil(len(audio) / HOP_LENGTH))
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
            chunk = audio[seek * HOP_LENGTH : (seek + segment_size) * HOP_LENGTH]
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
