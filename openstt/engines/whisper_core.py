"""Whisper's decoding on the model side: openai/whisper's ``decoding.py`` on transformers' modules.

``WhisperCore`` decodes windows of any requests in one batch: one encoder pass, then a KV-cached
decoder step at a time over every row, rows leaving the batch as they end. Its strategies are small
units, as in openai/whisper: ``TimestampRules`` (``whisper_tokens``) filters the logits,
``RowSampler`` samples the rows decoded hot (greedy rows take the argmax), ``BeamSearch`` runs
the beam jobs, and ``rank_samples`` keeps the likeliest of a window's samples. A window whose
result looks like a loop or garbage is decoded again down its fallback ladder on the same encoder
output (``engines.fallback``).
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
import zlib

import numpy as np
import torch

from openstt.audio import SAMPLE_RATE
from openstt.engines.fallback import compression_ratio, needs_fallback, settle
from openstt.engines.whisper_static import BUCKETS, DynamicDecoder, SlotStorage, StaticDecoder, bucket_for
from openstt.engines.whisper_tokens import Detokenizer, TimestampRules, TokenTable
from openstt.messages import AlignJob, DecodeResult, WindowJob
from openstt.transcript import Word

BEST_OF = 5  # samples per window when decoding at temperature > 0
# Sampled tokens a window may take: Whisper's 224 for a full window, fewer for a short one. Speech
# carries at most ~10 tokens a second (fast Mandarin; English ~5, timestamps included), so a
# window that runs past 32 + 12 per second is a loop. Without this a 1 s clip whose prompt makes
# Whisper loop (223 tokens of "1111") decoded 224 tokens at each of six temperatures: ~35 s of CPU.
TOKENS_PER_SECOND, TOKENS_BASE = 12, 32
SYNC_EVERY = 8  # static decoder: decoder steps between two checks for rows that ended


class RowSampler:
    """Temperature sampling for the rows decoded hot. A sampled row draws from a generator of its
    own, seeded by its window's audio (so the same file always gives the same transcript), its
    place among the window's samples (a job's rows are contiguous) and the temperature: not by its
    place in the batch, so a window decodes the same way whatever it is batched with. Greedy
    windows never pay for the checksum. (Tuples of ints and floats hash the same in every process;
    PYTHONHASHSEED only salts str and bytes.)"""

    def __init__(self, jobs: list[WindowJob], rows: list[int], temperatures: list[float], device: torch.device):
        self.temperature = [temperatures[j] for j in rows]
        seeds = {j: zlib.crc32(np.ascontiguousarray(jobs[j].audio, dtype=np.float32).view(np.uint8))
                 for j in set(rows) if temperatures[j] > 0}
        self.device = device
        self.generators = {k: torch.Generator(device=device).manual_seed(
                               hash((seeds[j], k - rows.index(j), self.temperature[k])) % 2**63)
                           for k, j in enumerate(rows) if self.temperature[k] > 0}

    def pick(self, logits: torch.Tensor, next_tokens: torch.Tensor, alive_rows: list[int]) -> None:
        """Replace, in place, the argmax of each sampled row by its sample."""
        for pos, k in enumerate(alive_rows):
            if k in self.generators:  # Gumbel-max: a sample of softmax(logits / T) from the row's own generator
                u = torch.rand(logits.shape[1], generator=self.generators[k], device=self.device).clamp_(1e-10, 1.0)
                next_tokens[pos] = (logits[pos] / self.temperature[k] - torch.log(-torch.log(u))).argmax()


def rank_samples(results: list[DecodeResult]) -> DecodeResult:
    """The likeliest of a window's samples by ``sum_logprob / (length + 1)`` (openai/whisper's
    ``MaximumLikelihoodRanker`` without length penalty); the first wins a tie."""
    best = results[0]
    for candidate in results[1:]:
        if candidate.sum_logprob / max(len(candidate.tokens) + 1, 1) > best.sum_logprob / max(len(best.tokens) + 1, 1):
            best = candidate
    return best


class BeamSearch:
    """openai/whisper's ``BeamSearchDecoder`` (patience 1) for the beam jobs of a batch: each step a
    job's ``beam_size`` rows are expanded over the vocabulary, the candidates ranked by cumulative
    logprob; those ending in eot become finished hypotheses, the best ``beam_size`` others the next
    beams (the KV cache rows follow them). The kept hypothesis is the best by
    ``sum_logprob / length``. A job's rows leave the batch together once it has ``beam_size``
    finished hypotheses."""

    def __init__(self, beam_of: dict[int, int], first: dict[int, int], eot: int, device: torch.device):
        self.beam_of, self.first, self.eot, self.device = beam_of, first, eot, device
        # each job's finished hypotheses: (sum_logprob incl. eot, tokens, their logprobs), on the device
        self.finished: dict[int, list[tuple[float, torch.Tensor, torch.Tensor]]] = {j: [] for j in beam_of}
        self.open = sorted(beam_of)  # jobs still decoding

    def start(self, sum_logprobs: torch.Tensor) -> None:
        """A job's rows start alike: only its first expands at step 0."""
        for j, size in self.beam_of.items():
            sum_logprobs[self.first[j] + 1 : self.first[j] + size] = -np.inf

    def layout(self, alive_rows: list[int]) -> list[tuple[int, list[int], torch.Tensor]]:
        """The still-decoding jobs grouped by beam size: (size, jobs, their rows' places in the
        batch as a (jobs, size) tensor). A job's rows are contiguous and leave the batch together."""
        place = {k: p for p, k in enumerate(alive_rows)}
        by_size: dict[int, list[int]] = {}
        for j in self.open:
            by_size.setdefault(self.beam_of[j], []).append(j)
        return [(size, js, torch.tensor([[place[self.first[j]] + b for b in range(size)] for j in js],
                                        device=self.device))
                for size, js in by_size.items()]

    def step(self, layout, logprobs: torch.Tensor, sums: torch.Tensor, next_tokens: torch.Tensor,
             current: torch.Tensor, tokens: torch.Tensor, history: torch.Tensor, width: int):
        """One step for every beam job, in place on ``next_tokens`` and ``current`` (the token and
        its logprob each row appends). Returns the alive position each row continues from, (rows,
        cumulative logprobs) of the new beams, and the jobs completed (no longer ``open``).

        On the device: the 2 x size best candidates of each job over its rows x vocabulary (at
        most ``size`` end in eot, one per row, so the best ``size`` others are among them). One
        transfer brings them here to collect the finished hypotheses, as openai/whisper does: the
        eot candidates ranked above the last kept beam, until the job has ``size`` of them."""
        vocab = logprobs.shape[1]
        source = torch.arange(len(sums), device=self.device)
        places, values, reports = [], [], []
        for size, _, place in layout:
            candidates = (sums[place][..., None] + logprobs[place]).flatten(1)  # (jobs, size * vocab)
            top, index = candidates.topk(2 * size, dim=1)
            beam, token = index // vocab, index % vocab
            # the first `size` candidates not ending in eot, in rank order (a stable sort keeps it)
            kept = torch.sort((token == self.eot).int(), dim=1, stable=True).indices[:, :size]
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
                done = self.finished[j]
                kept = 0
                for r in range(g * 2 * size, (g + 1) * 2 * size):
                    if int(token[r]) != self.eot:
                        kept += 1
                        if kept == size:
                            break
                    elif len(done) < size and top[r] > -np.inf:
                        row = self.first[j] + int(beam[r])  # rows keep their place in ``tokens`` and ``history``
                        done.append((top[r], tokens[row, width:].clone(), history[row].clone()))
                if len(done) >= size:
                    ended.add(j)
        self.open = [j for j in self.open if j not in ended]
        return source, (torch.cat(places), torch.cat(values)), ended

    def result(self, j: int, sums: list[float], all_tokens: list[list[int]], logprob_rows: list[list[float]],
               **fields) -> DecodeResult:
        """Job ``j``'s kept hypothesis: finished ones first; at the length limit, the likeliest
        unfinished beams fill up to the beam size (as openai/whisper's ``finalize``)."""
        size, first = self.beam_of[j], self.first[j]
        hypotheses = [(score, len(seq), seq, lps, True) for score, seq, lps in self.finished[j]]
        unfinished = sorted(range(first, first + size), key=lambda k: sums[k], reverse=True)
        hypotheses += [(sums[k], len(all_tokens[k]), all_tokens[k], logprob_rows[k][: len(all_tokens[k])], False)
                       for k in unfinished[: max(size - len(hypotheses), 0)]]
        score, length, seq, token_logprobs, ended = max(hypotheses, key=lambda h: h[0] / max(h[1], 1))
        if isinstance(seq, torch.Tensor):
            seq, token_logprobs = seq.tolist(), token_logprobs.tolist()
        return DecodeResult(tokens=seq, token_logprobs=token_logprobs, sum_logprob=score,
                            avg_logprob=score / max(length + (1 if ended else 0), 1), truncated=not ended, **fields)


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
                 dtype: torch.dtype, aligner=None, decoder: str = "eager"):
        self.model, self.processor, self.table = model, processor, table
        self.tokenizer = processor.tokenizer
        self.multilingual = multilingual
        self.device, self.dtype = device, dtype
        self.n_text_ctx = model.config.max_target_positions
        self.aligner = aligner
        self.rules = TimestampRules(table)
        # "eager": transformers' decoder, its cache growing per step; "static": preallocated slots per
        # bucket of rows (whisper_static); "graphs": static, each bucket's step replayed as a CUDA graph
        if decoder not in ("eager", "static", "graphs"):
            raise ValueError(f"decoder must be eager, static or graphs, got {decoder!r}")
        self.decoder_mode = decoder
        self._static: dict[int, StaticDecoder] = {}  # by bucket, reused batch after batch
        self._storage: SlotStorage | None = None  # the slots they share (the largest bucket's)
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

    def _decoder(self, encoder_states: torch.Tensor) -> DynamicDecoder | StaticDecoder:
        """The decoder state of a batch of rows: transformers' growing cache, or (``static``,
        ``graphs``) this bucket's slots, when the rows fit the largest bucket."""
        if self.decoder_mode == "eager" or len(encoder_states) > BUCKETS[-1]:
            return DynamicDecoder(self.model, encoder_states)
        size = bucket_for(len(encoder_states))
        storage = self._storage
        if storage is None or storage.rows < size or storage.encoder_len != encoder_states.shape[1]:
            # a larger bucket than warmed (beams, best-of): new slots, and the decoders (and graphs)
            # that pointed at the old ones go
            self._storage = storage = SlotStorage(self.model, max(size, storage.rows if storage else 0),
                                                  self.n_text_ctx, encoder_states.shape[1], self.device,
                                                  encoder_states.dtype)
            self._static.clear()
        if size not in self._static:
            self._static[size] = StaticDecoder(self.model, size, self.n_text_ctx, encoder_states.shape[1],
                                               self.device, encoder_states.dtype, storage=storage,
                                               graphs=self.decoder_mode == "graphs" and self.device.type == "cuda")
        return self._static[size].start(encoder_states)

    def warm(self, rows: int) -> str | None:
        """Prepare the static decoder for batches of up to ``rows`` rows at load: the shared slots
        and every bucket's decoder, each run once (with ``graphs``, that step is captured). Returns
        what it took, for the startup line; None for the eager decoder."""
        if self.decoder_mode == "eager":
            return None
        started = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
        frames = self.model.config.max_source_positions
        buckets = [b for b in BUCKETS if b <= bucket_for(min(rows, BUCKETS[-1]))]
        with self.lock, torch.inference_mode():
            for size in reversed(buckets):  # the largest first: the slots are allocated once
                states = torch.zeros((size, frames, self.model.config.d_model), device=self.device, dtype=self.dtype)
                decoder = self._decoder(states)
                first = torch.full((size, 1), self.table.sot, device=self.device)
                decoder.prefill(first, torch.ones_like(first), torch.zeros_like(first))
                decoder.step(first[:, 0], torch.ones_like(first[:, 0]))
        graphs = sum(d._graph is not None for d in self._static.values())
        used = (torch.cuda.memory_allocated(self.device) - before) if cuda else self._storage.bytes
        return (f"{self.decoder_mode} decoder warmed for buckets {buckets[0]}-{buckets[-1]} rows in "
                f"{time.perf_counter() - started:.1f} s, {used / 1e6:,.0f} MB"
                + (f", {graphs} CUDA graphs" if self.decoder_mode == "graphs" else ""))

    def _rows(self, jobs: list[WindowJob], languages: list[str], temperatures: list[float]):
        """The batch's rows: a greedy job has one, a sampled job ``BEST_OF``, a beam job ``beam_size``
        (contiguous). Returns each row's job, each row's initial tokens, and the beam search."""
        t = self.table
        rows: list[int] = []
        initials: list[list[int]] = []
        beam_of: dict[int, int] = {}
        first: dict[int, int] = {}
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
            rows += [j] * count
            initials += [initial] * count
        return rows, initials, BeamSearch(beam_of, first, t.eot, self.device)

    def _decode_rows(self, encoded: torch.Tensor, jobs: list[WindowJob], languages: list[str],
                     temperatures: list[float]) -> list[DecodeResult]:
        """One decoding pass over ``jobs`` at the given temperatures: greedy at 0 (beam search at 0
        for a job with ``beam_size`` > 1), else the best of ``BEST_OF`` samples. Rows that have
        emitted end-of-text leave the batch."""
        t = self.table
        rows, initials, beams = self._rows(jobs, languages, temperatures)
        n = len(rows)
        width = max(len(i) for i in initials)
        # left-pad to a common length so every row samples from the same column on
        tokens = torch.tensor([[t.eot] * (width - len(i)) + i for i in initials], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in initials], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        sot_index = torch.tensor([width - len(i) + i.index(t.sot) for i in initials], device=self.device)
        encoder_states = encoded[torch.tensor(rows, device=self.device)]
        sampler = RowSampler(jobs, rows, temperatures, self.device)
        decoder = self._decoder(encoder_states)
        alive = torch.arange(n, device=self.device)  # rows still decoding; the batch shrinks as rows end
        alive_rows = list(range(n))
        sum_logprobs = torch.zeros(n, device=self.device)
        beams.start(sum_logprobs)
        history = torch.zeros((n, 0), device=self.device)  # logprob of each row's tokens (0 once ended)
        beam_layout = beams.layout(alive_rows)
        no_speech = torch.zeros(n)
        next_positions = positions[:, -1] + 1  # each row's decoder position for its next token
        longest = max(len(job.audio) for job in jobs) / SAMPLE_RATE
        max_len = min(self.n_text_ctx, width + min(self.n_text_ctx // 2, TOKENS_BASE + int(TOKENS_PER_SECOND * longest)))
        next_tokens = None
        # A static decoder runs every slot each step anyway, so rows that end stay in the batch, their
        # tokens forced to end-of-text, and leave every SYNC_EVERY steps: one host sync per 8 steps
        # instead of one per step (on a GPU a sync stalls the queue of launched kernels). Beam search
        # reads its candidates every step regardless.
        lazy = isinstance(decoder, StaticDecoder) and not beams.beam_of
        ended_rows = torch.zeros(n, dtype=torch.bool, device=self.device)  # by alive position
        steps = 0
        while tokens.shape[1] < max_len:
            self.decoder_rows.append(len(alive_rows))
            if next_tokens is None:  # the first step reads every initial token
                hidden = decoder.prefill(tokens, mask, positions)
                if t.no_speech is not None:
                    at_sot = hidden[torch.arange(n), sot_index]
                    no_speech = torch.softmax(self._logits(at_sot), dim=-1)[:, t.no_speech].cpu()
                hidden = hidden[:, -1]
            else:
                hidden = decoder.step(next_tokens, next_positions)
                next_positions = next_positions + 1
            logits = self._logits(hidden)
            self.rules.apply(logits, tokens[alive], width)
            logprobs = torch.log_softmax(logits, dim=-1)
            next_tokens = logits.argmax(dim=-1)
            sampler.pick(logits, next_tokens, alive_rows)
            if lazy:
                next_tokens = next_tokens.masked_fill(ended_rows, t.eot)
            current = logprobs[torch.arange(len(alive_rows)), next_tokens]
            if lazy:
                current = current.masked_fill(ended_rows, 0.0)
            source = None  # with beams: the row (alive position) each row continues from
            if beam_layout:
                source, beam_sums, ended = beams.step(beam_layout, logprobs, sum_logprobs[alive], next_tokens,
                                                      current, tokens, history, width)
            stay = next_tokens != t.eot  # a beam row's token never is: its job leaves once complete
            sum_logprobs[alive] += current
            if source is not None:
                sum_logprobs[alive[beam_sums[0]]] = beam_sums[1]  # cumulative logprob of the beam each row now holds
                order = torch.arange(n, device=self.device)
                order[alive] = alive[source]
                tokens, history = tokens[order], history[order]
                decoder.reorder(source)
                if ended:
                    stay[torch.tensor([p for p, k in enumerate(alive_rows) if rows[k] in ended],
                                      device=self.device)] = False
            history = torch.cat([history, torch.zeros(n, device=self.device).index_put_((alive,), current)[:, None]],
                                dim=1)
            column = torch.full((n,), t.eot, device=self.device).index_put_((alive,), next_tokens)
            tokens = torch.cat([tokens, column[:, None]], dim=1)
            steps += 1
            if lazy:
                ended_rows = ~stay
                if steps % SYNC_EVERY:
                    continue
            keep = stay.nonzero().flatten()
            if len(keep) == 0:
                break
            if len(keep) < len(alive_rows):  # the ended rows leave the decoder and every per-row input
                decoder.keep(keep)
                alive, next_tokens, next_positions = alive[keep], next_tokens[keep], next_positions[keep]
                alive_rows = alive.tolist()
                beam_layout = beams.layout(alive_rows)
                ended_rows = ended_rows[keep]

        all_tokens = tokens[:, width:].tolist()  # one transfer for the whole batch
        logprob_rows = history.tolist()
        sums, no_speech_probs = sum_logprobs.tolist(), no_speech.tolist()
        samples: dict[int, list[DecodeResult]] = collections.defaultdict(list)
        for k, j in enumerate(rows):
            if j in beams.beam_of:
                continue
            seq = all_tokens[k]
            ended = t.eot in seq
            seq = seq[: seq.index(t.eot)] if ended else seq
            count = len(seq) + (1 if ended else 0)  # Whisper averages over the sampled tokens incl. eot
            samples[j].append(DecodeResult(
                tokens=seq, token_logprobs=logprob_rows[k][: len(seq)], sum_logprob=sums[k],
                avg_logprob=sums[k] / max(count, 1), no_speech_prob=no_speech_probs[k],
                temperature=temperatures[j], language=languages[j], truncated=not ended,
            ))
        results = [beams.result(j, sums, all_tokens, logprob_rows, no_speech_prob=no_speech_probs[beams.first[j]],
                                temperature=temperatures[j], language=languages[j])
                   if j in beams.beam_of else rank_samples(samples[j]) for j in range(len(jobs))]
        for r in results:
            r.compression_ratio = compression_ratio(self.text_of(r.tokens))
        return results

    def align(self, job: AlignJob) -> list[list[Word]]:
        """Word timings (relative to the window start) for each segment of a decoded window."""
        with self.lock, torch.inference_mode():
            encoded = self._encodings.pop(_digest(job.audio), None)
            if encoded is None:  # decoded by another model service, or evicted
                encoded = self.encode(self.features([job.audio]))
            return self.aligner(encoded, job.segment_tokens, job.num_frames,
                                self.sot_sequence(job.language, job.task), job.language)
