"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), in-process
with the real tiny.en model behind the server's API side (``tests.inmemory``). Whatever the
generated request, the server must not answer 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from openstt.api.app import create_app
from openstt.api.state import app_state
from tests.inmemory import inmemory_app

app = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def loaded(tiny_en_engine, hf_cache):
    inmemory_app([tiny_en_engine], hf_cache, app=app)
    yield
    app_state(app).registry = None


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
