"""What can go wrong with the models a server serves, in the domain's terms: no HTTP here.

The registry, the model manager and the app state raise these; ``openstt.api.errors`` maps each
one to OpenAI's error envelope and an HTTP status (and registers the FastAPI handler, so routes
just let them propagate). Each error is worded once, here, as its ``message`` (also its ``str``):
the API answers with it and logs show the same text.

Failures that cross from the model service travel as ``openstt.messages.ErrorCode``: a
failed runtime load keeps its code (``ModelLoadFailed.code``), as a failed window does
(``openstt.messages.ModelFailure``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openstt.catalog import OPENAI_ALIAS

if TYPE_CHECKING:
    from openstt.messages import ErrorCode


class OpenSTTError(Exception):
    """A failure a client is told about; ``message`` says what happened and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelsLoading(OpenSTTError):
    """The server has not finished loading its models; retrying shortly helps."""

    def __init__(self):
        super().__init__("The server is still loading its models; retry shortly.")


class ModelNotFound(OpenSTTError, LookupError):
    """``name`` is not served here: no loaded model has that name, or it is an alias whose model
    is not loaded now (``alias_of``). ``served``: the models that are; ``loadable`` (for runtime
    loading): the models this server could load, when ``name`` is none of them either."""

    def __init__(self, name: str, served: list[str], *, alias_of: str | None = None,
                 loadable: list[str] | None = None):
        self.name, self.served, self.alias_of, self.loadable = name, list(served), alias_of, loadable
        reason = (f"is an alias of `{alias_of}`, which is not loaded now" if alias_of
                  else "does not exist or you do not have access to it")
        message = f"The model `{name}` {reason}. Models served here: {', '.join(served)}."
        if loadable is not None:
            message += f" Models this server can load: {', '.join(loadable)} (or their Hugging Face repo ids)."
        super().__init__(message)


class ModelIsAlias(OpenSTTError, ValueError):
    """Runtime load/unload was asked for an alias; only the model it names can be loaded or unloaded."""

    def __init__(self, name: str, target: str):
        self.name, self.target = name, target
        super().__init__(f"'{name}' is an alias (of '{target}' now); load or unload the model it names instead.")


class ModelManagementDisabled(OpenSTTError):
    """Runtime load/unload is off on this server (OPEN_STT_ENABLE_MODEL_MANAGEMENT)."""

    def __init__(self):
        super().__init__("Loading and unloading models at runtime is disabled on this server. Start it with "
                         "--enable-model-management (OPEN_STT_ENABLE_MODEL_MANAGEMENT=true) to allow it.")


class ShuttingDown(OpenSTTError):
    """This server is stopping (SIGTERM): it finishes what it has, and new work goes elsewhere."""

    def __init__(self):
        super().__init__("This server is shutting down and takes no new requests; retry (another replica answers).")


class ModelManagementReplicated(OpenSTTError):
    """Runtime load/unload with several model-service replicas: one started later (or restarted)
    would not have the model, so requests would fail on it at random."""

    def __init__(self, replicas: int):
        super().__init__(f"Loading and unloading models at runtime is not available when the API sends its work to "
                         f"several model-service replicas ({replicas} now, and more may join). Set the models of "
                         "every replica with OPEN_STT_MODELS instead, and restart them.")


class DefaultModelPinned(OpenSTTError, ValueError):
    """The default model cannot be unloaded: ``whisper-1`` and requests without a model rely on it."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"Model '{name}' is the default model (OPEN_STT_DEFAULT_MODEL) and serves "
                         f"'{OPENAI_ALIAS}' and default requests; it cannot be unloaded.")


class ModelLoadFailed(OpenSTTError):
    """The model service could not load ``name``'s weights at runtime: ``code`` says why
    (``insufficient_memory``, ``not_available``, ``download_failed``, ...), ``message`` is its
    path-free explanation."""

    def __init__(self, name: str, code: ErrorCode, message: str):
        self.name, self.code = name, code
        super().__init__(message)
