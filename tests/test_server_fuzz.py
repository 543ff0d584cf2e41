"""Property-based API fuzzing with schemathesis against the app's own OpenAPI schema, in-process.

For every operation, a bounded number of generated requests (valid and invalid): no 5xx, every status and
content type documented, every JSON body matching its schema. (The schema is built at import, not through
`schemathesis.pytest.from_fixture`, whose lazy loader breaks on pytest 9: it sets `node._nodeid`.)
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from server_helpers import tiny_model

from tinyllm import assets
from tinyllm.server import SamplingDefaults, ServerSettings, create_app
from tinyllm.server.worker import LoadedModel
from tinyllm.tokenizer import get_tokenizer

schemathesis = pytest.importorskip("schemathesis")
if not assets.gpt2_ranks_path().exists():
    pytest.skip("GPT-2 BPE ranks not fetched; run `tinyllm fetch-assets`", allow_module_level=True)

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.timeout(180)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


TOKENIZER = get_tokenizer()
# Both models loaded: the only 5xx left would be bugs (a missing model's 503 is tested elsewhere). Short
# generations keep it fast: at most 4 new tokens (more is a documented 400).
# schemathesis runs the app's lifespan itself on first use; `_stop_lifespans` ends it.
APP = create_app(
    ServerSettings(
        checkpoint=None,
        gpt2=None,
        slots=4,
        max_queue=32,
        max_new_tokens_cap=4,
        sampling=SamplingDefaults(max_new_tokens=4),
        allowed_hosts=("localhost", "testserver"),  # schemathesis's ASGI client sends Host: testserver
    ),
    loaders={
        "custom": lambda: LoadedModel(tiny_model(0), TOKENIZER),
        "gpt2": lambda: LoadedModel(tiny_model(1), TOKENIZER),
    },
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _stop_lifespans():  # noqa: ANN202
    yield
    shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case) -> None:  # noqa: ANN001
    case.call_and_validate(checks=CHECKS)
