"""The batched timestamp grammar equals openai/whisper's per-row rules on random sequences.

``TimestampRules.apply`` is written as whole-batch tensor operations (no device sync per row);
``reference_rules`` below is the straightforward per-row port of openai/whisper's
``ApplyTimestampRules`` it replaced. Random valid-looking sequences must get identical masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openstt.engines.whisper_tokens import MAX_INITIAL_TIMESTAMP_INDEX, TimestampRules, TokenTable

VOCAB, EOT, TS = 140, 50, 60
TABLE = TokenTable(eot=EOT, sot=51, sot_prev=52, no_timestamps=TS - 1, timestamp_begin=TS, no_speech=53,
                   transcribe=54, translate=55, lang_to_id={"en": 56}, suppress=[3, 51, 52, 53, 54, 55],
                   begin_suppress=[7, EOT], vocab_size=VOCAB)


def reference_rules(logits: torch.Tensor, tokens: torch.Tensor, sample_begin: int) -> None:
    t, ts = TABLE, TS
    step = tokens.shape[1] - sample_begin
    if step == 0:
        logits[:, t.begin_suppress] = -np.inf
    logits[:, t.suppress] = -np.inf
    logits[:, t.no_timestamps] = -np.inf
    for k in range(tokens.shape[0]):
        seq = tokens[k, sample_begin:]
        last_was_ts = len(seq) >= 1 and int(seq[-1]) >= ts
        penultimate_was_ts = len(seq) < 2 or int(seq[-2]) >= ts
        if last_was_ts:
            if penultimate_was_ts:
                logits[k, ts:] = -np.inf
            else:
                logits[k, : t.eot] = -np.inf
        stamps = seq[seq >= ts]
        if stamps.numel() > 0:
            last = int(stamps[-1]) if last_was_ts and not penultimate_was_ts else int(stamps[-1]) + 1
            logits[k, ts:last] = -np.inf
    if step == 0:
        logits[:, :ts] = -np.inf
        logits[:, ts + MAX_INITIAL_TIMESTAMP_INDEX + 1 :] = -np.inf
    logprobs = torch.log_softmax(logits, dim=-1)
    ts_logprob = torch.logsumexp(logprobs[:, ts:], dim=-1)
    text_max = logprobs[:, :ts].max(dim=-1).values
    logits[ts_logprob > text_max, :ts] = -np.inf


def _sequence(rng: np.random.Generator, length: int) -> list[int]:
    """Text and non-decreasing timestamps, the shapes the grammar itself produces."""
    seq, stamp = [], TS
    for _ in range(length):
        if rng.random() < 0.35:
            stamp = min(stamp + int(rng.integers(0, 6)), VOCAB - 1)
            seq.append(stamp)
        else:
            seq.append(int(rng.integers(0, EOT)))
    return seq


@pytest.mark.parametrize("seed", range(40))
def test_batched_rules_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    rows, prefix, length = 6, int(rng.integers(1, 4)), int(rng.integers(0, 12))
    tokens = torch.tensor([[51] * prefix + _sequence(rng, length) for _ in range(rows)])
    logits = torch.tensor(rng.standard_normal((rows, VOCAB)) * 3, dtype=torch.float32)
    ours, expected = logits.clone(), logits.clone()
    TimestampRules(TABLE).apply(ours, tokens, prefix)
    reference_rules(expected, tokens, prefix)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.equal(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
