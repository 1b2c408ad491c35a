"""What the benchmarks (``scripts/bench*``, ``scripts/eval_wer.py``, ...) and the tests share. Not
part of the runtime package: nothing in ``openstt`` imports it, and it is not installed.

- ``speech``: real read speech (Debian's asterisk prompts) as clips of a given length, in turns, in
  other languages, with their transcripts; WER with Whisper's text normalisers.
- ``conversations``: multi-speaker conversations built from those prompts, with their truth (RTTM),
  and a harder set (overlaps, back-channels, telephone, noise).
- ``real_conversations``: real recorded conversations with speaker labels (tests/data/conversations).
- ``server``: one launcher of a real ``open-stt-server`` (``Server``, ``free_port``, ``server_env``),
  its process tree's resident memory, and its /metrics scraped.
- ``audio``: audio encoded into containers (``encode``) and 16-bit WAV (``wav``), silent FLAC files.
- ``realtime``: a live transcription session driven as a client does (24 kHz PCM16 frames at a
  microphone's pace through the official SDK), and the checks of what it sends back.
- ``peers``: faster-whisper on the CTranslate2 export our bundled weights were rebuilt from.
- ``checkpoints``: random-weight checkpoints with real architectures (Voxtral, Whisper with 128 mel
  bins), for the code paths whose real weights cannot be fetched here.

Modules import only what the runtime needs anyway at the top (numpy, PyAV, soundfile, torch, the
standard library); test and benchmark extras (httpx, openai, jiwer, psutil, faster-whisper, ...) are
imported where used, so ``tests/conftest.py`` imports the kit without them.
"""
