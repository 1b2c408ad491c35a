"""Diarization for an audio request: its known speakers' reference clips, and who spoke when, found
by the model service while the transcription runs (``diarization.attribution`` then gives each
word its speaker)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
from fastapi import Request

from openstt.api.errors import bad_request
from openstt.api.forms import AudioRequest
from openstt.api.state import app_state
from openstt.audio import SAMPLE_RATE, AudioError, decode_audio
from openstt.diarization.attribution import Speakers
from openstt.messages import MAX_SPEAKERS
from openstt.messages import DiarizeJob, ModelFailure

MIN_REFERENCE_SECONDS, MAX_REFERENCE_SECONDS = 1.0, 10.0


def reference_voices(req: AudioRequest) -> list[np.ndarray]:
    """The known speakers' reference clips, decoded (any container we read), 1 to 10 s each."""
    voices = []
    for i, data in enumerate(req.known_speaker_references):
        try:
            audio = decode_audio(io.BytesIO(data), max_duration=MAX_REFERENCE_SECONDS + 1)
        except AudioError as exc:
            raise bad_request(f"known_speaker_references[{i}] is not audio we can decode: {exc.message}",
                              param="known_speaker_references") from None
        seconds = len(audio) / SAMPLE_RATE
        if not MIN_REFERENCE_SECONDS <= seconds <= MAX_REFERENCE_SECONDS:
            raise bad_request(f"known_speaker_references[{i}] is {seconds:.1f} s long; references must be "
                              f"{MIN_REFERENCE_SECONDS:g} to {MAX_REFERENCE_SECONDS:g} s of the speaker's voice.",
                              param="known_speaker_references")
        voices.append(audio)
    return voices


def start_diarization(request: Request, req: AudioRequest, audio: np.ndarray, references: list[np.ndarray],
                      probabilities: np.ndarray) -> asyncio.Task:
    """Who spoke when, found by the model service while the transcription runs."""
    diarize = app_state(request.app).diarize
    job = DiarizeJob(audio=audio, probabilities=probabilities, references=references,
                     names=req.known_speaker_names, num_speakers=req.num_speakers,
                     min_speakers=req.min_speakers or 1, max_speakers=req.max_speakers or MAX_SPEAKERS)

    async def speakers() -> Speakers:
        reply = await diarize(job)
        if reply.error is not None:
            raise ModelFailure(reply.error)
        return Speakers(reply.turns)

    return asyncio.create_task(speakers())
