"""Kernel choices per device (openstt.device.tune_backends)."""

from __future__ import annotations

import torch

from openstt.device import tune_backends


def test_cuda_turns_off_cudnn_attention_and_cpu_changes_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda enabled: calls.append(enabled))
    tune_backends(torch.device("cpu"))
    assert calls == []
    tune_backends(torch.device("cuda"))  # flag only: no CUDA device is needed to set it
    assert calls == [False]
