"""What an audio request asks of its engine: the checks of its fields against the model and the
server (``check_capabilities``), and its ``TranscribeOptions``."""

from __future__ import annotations

from openstt.api.errors import bad_request
from openstt.api.forms import AudioRequest
from openstt.engines.base import TranscribeOptions
from openstt.vad import VadOptions


def check_capabilities(req: AudioRequest, engine, diarization: bool) -> None:
    if req.diarized and not diarization:
        raise bad_request("Speaker diarization is not enabled on this server: start it with --enable-diarization "
                          "(OPEN_STT_ENABLE_DIARIZATION=true).",
                          param="response_format" if req.response_format == "diarized_json" else "diarize",
                          code="unsupported_value")
    if "logprobs" in req.include and not (req.response_format == "json" or req.stream):
        raise bad_request("logprobs are only available with response_format 'json' or with stream=true.",
                          param="include", code="unsupported_value")
    if (req.response_format == "verbose_json" and "word" in req.timestamp_granularities
            and not engine.supports_word_timestamps):
        raise bad_request(f"Model '{engine.name}' does not provide word timestamps.",
                          param="timestamp_granularities", code="unsupported_value")


def vad_options(strategy: VadOptions | str | None, long_form: str) -> VadOptions | None:
    """The VAD-chunked mode's settings for this request, or None for the sequential procedure:
    ``chunking_strategy`` when given (``none``: sequential), else the server's ``long_form``."""
    if strategy is None:
        return VadOptions() if long_form == "vad" else None
    return None if strategy == "none" else strategy


def transcribe_options(req: AudioRequest, long_form: str = "sequential", beam_size: int = 1,
                       word_timestamps: bool = False) -> TranscribeOptions:
    """The request's options; ``long_form`` and ``beam_size``: the server's defaults for what it
    omits; ``word_timestamps``: time the words even if the answer does not show them."""
    return TranscribeOptions(
        task=req.task, language=req.language, languages=tuple(req.languages), prompt=req.prompt,
        keywords=tuple(req.keywords), temperature=req.temperature,
        beam_size=req.beam_size if req.beam_size is not None else beam_size,
        word_timestamps=word_timestamps or (req.response_format == "verbose_json"
                                            and "word" in req.timestamp_granularities),
        token_logprobs="logprobs" in req.include, vad=vad_options(req.chunking, long_form), stream=req.stream,
    )


# Formats that show segment times. Whisper's timestamp tokens can be far off (on a real phone
# call whisper-base stamped 30 s of speech 0-20 s; a 7 s silent lead-in gave a segment 0.00-9.68 s),
# so their segments are held to the speech. That costs one VAD pass: 0.37 s for 5 minutes, 4 % of
# tiny.en's sequential transcription (VAD mode shares the pass it makes anyway).
# Word times fix more (segments span their words) but add 16-27 %: they stay a request's choice.
SEGMENT_TIMED = frozenset({"verbose_json", "srt", "vtt"})
