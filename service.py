"""BentoML wiring: one service holding the resident models, with the OpenAI routes at ``/``.

All behaviour lives in the ``openstt`` package; configuration comes from ``OPEN_STT_*``
environment variables (``open-stt-server`` sets them from its flags).
"""

from __future__ import annotations

import bentoml

from openstt.api.app import create_app
from openstt.bootstrap import load_settings, prepare_models, start_models

app = create_app()

# Long audio takes long: BentoML's 60 s default would cut off a 20-minute file on CPU.
REQUEST_TIMEOUT_S = 3600


@bentoml.service(name="OpenSTT", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
@bentoml.asgi_app(app, path="/")
class OpenSTT:
    def __init__(self) -> None:
        # Runs once per worker process: load every configured model and keep it resident.
        self.registry = start_models(app)

    def __is_ready__(self) -> bool:
        return self.registry is not None

    @bentoml.on_deployment
    def prepare() -> None:
        # Runs once in the `bentoml serve` parent before workers start: validate the
        # configuration and fetch missing weights (with --download) a single time, so a bad
        # setup stops the server with a clear message instead of crash-looping workers.
        prepare_models(load_settings())
