"""Whisper's language table: ISO-639-1 codes and the full names verbose_json reports."""

from __future__ import annotations

from transformers.models.whisper.tokenization_whisper import LANGUAGES

# code -> lowercase English name, e.g. "en" -> "english", "zh" -> "chinese"
LANGUAGE_NAMES: dict[str, str] = dict(LANGUAGES)


def normalize_language(value: str | None) -> str | None:
    """Return the lowercase ISO code, None when absent, or raise ValueError for unknown codes."""
    if value is None or not value.strip():
        return None
    code = value.strip().lower()
    if code not in LANGUAGE_NAMES:
        raise ValueError(code)
    return code
