"""Logging for the ``openstt`` loggers, fitted into whatever handlers BentoML already set up."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int, fmt: str = "text") -> None:
    """Set open-stt's log level and format.

    ``text``: lines go through BentoML's handler (a stderr handler is added only when nothing
    upstream prints, to avoid doubled lines). ``json``: one JSON object per line on stdout, with
    the structured fields of request lines (request_id, model, audio_seconds, ...) as keys.
    """
    logger = logging.getLogger("openstt")
    logger.setLevel(level)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        if not any(getattr(h, "_openstt_json", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                               rename_fields={"levelname": "level", "asctime": "time"}))
            handler._openstt_json = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False
    elif not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    # transformers logs deprecation and generation notices (Voxtral decodes with its generate())
    # and draws per-tensor progress bars at load; both are noise to an operator unless debugging.
    debugging = level <= logging.DEBUG
    logging.getLogger("transformers").setLevel(logging.INFO if debugging else logging.ERROR)
    if not debugging:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _CallerLeft(logging.Filter):
    """BentoML logs a traceback (and answers 500) when a caller disconnects while it still reads the
    request's body. In the model service that caller is the API process dropping the windows of a
    request whose client left (a long file's chunks travel as one 10 MB call): expected, so one
    debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from starlette.requests import ClientDisconnect

        if record.exc_info and isinstance(record.exc_info[1], ClientDisconnect):
            logging.getLogger("openstt.serving").debug("a caller left while sending %s", record.args)
            return False
        return True


def quiet_caller_disconnects() -> None:
    """In the model service: a caller that left mid-request is not an error (see ``_CallerLeft``)."""
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_CallerLeft())
