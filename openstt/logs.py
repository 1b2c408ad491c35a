"""Logging for the ``openstt`` loggers, fitted into whatever handlers BentoML already set up."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int) -> None:
    """Set open-stt's log level; add a stderr handler only when nothing upstream prints.

    Under ``bentoml serve`` the root logger already has BentoML's handler, so adding one here
    would print every line twice.
    """
    logger = logging.getLogger("openstt")
    logger.setLevel(level)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    # transformers repeats a deprecation notice from inside Whisper's own generate() and draws
    # per-tensor progress bars at load; both are noise to an operator unless debugging.
    debugging = level <= logging.DEBUG
    logging.getLogger("transformers").setLevel(logging.INFO if debugging else logging.ERROR)
    if not debugging:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
