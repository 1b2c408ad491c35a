"""Whisper's tokens: a checkpoint's special token ids, detokenising, and the logit rules every
decoding step applies (suppressed tokens and the timestamp grammar). Shared by the model side
(``whisper_core``) and the API side's window loop (``whisper_loop``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from openstt.audio import HOP, SAMPLE_RATE

N_FRAMES = 3000  # mel frames in one 30 s window
FRAME_SECONDS = HOP / SAMPLE_RATE  # 0.01: one mel frame
TIME_PRECISION = 0.02  # seconds per timestamp token
MAX_INITIAL_TIMESTAMP_INDEX = 50  # the first timestamp is at most 1.0 s


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


BYTE_DECODER = _byte_decoder()


class Detokenizer:
    """``text_of`` for the model side and the loop alike (both have a ``tokenizer`` and a ``table``)."""

    tokenizer: object
    table: TokenTable

    def text_of(self, tokens: list[int]) -> str:
        """The text of ``tokens``, timestamps and other special tokens left out."""
        return self.tokenizer.decode([tok for tok in tokens if tok < self.table.eot])


class TimestampRules:
    """Whisper's logit filters (openai/whisper's ``SuppressBlank``, ``SuppressTokens`` and
    ``ApplyTimestampRules``): suppressed tokens, blank start, and the timestamp grammar.

    Written as whole-batch tensor operations: a per-row loop reading token values costs a device
    synchronisation per row and step, which dominated decoding on a GPU."""

    def __init__(self, table: TokenTable):
        self.table = table

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor, sample_begin: int) -> None:
        """Mask, in place, the tokens ``logits`` (rows, vocabulary) may not take after ``tokens``,
        whose sampled part starts at column ``sample_begin``."""
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
