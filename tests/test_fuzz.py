"""Fuzz the public API from its own OpenAPI document (schemathesis), against a real cluster.

Every generated request, valid or deliberately malformed, must get a documented answer that
matches its schema, and never a 5xx; afterwards the ledger checker must still be clean. The
examples per operation and mode are bounded (and derandomized) so the suite stays fast and
repeatable. Schemathesis' Python API drives Hypothesis directly here: its pytest plugin does
not yet run on pytest 9.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Cluster

OPENAPI = Path(__file__).parents[1] / "gateway" / "openapi.json"
EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def public_api() -> Any:
    return schemathesis.openapi.from_path(OPENAPI)


def cases() -> list[tuple[str, GenerationMode]]:
    """Every operation with valid data, and those that take input with malformed data too."""
    doc = json.loads(OPENAPI.read_text())
    found = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            label = f"{method.upper()} {path}"
            found.append((label, GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody"):
                found.append((label, GenerationMode.NEGATIVE))
    return found


@pytest.mark.parametrize(("label", "mode"), cases(), ids=lambda v: getattr(v, "value", v))
def test_no_generated_request_gets_a_server_error(
    public_api: Any, cluster: Cluster, label: str, mode: GenerationMode
) -> None:
    operation = next(op.ok() for op in public_api.get_all_operations() if op.ok().label == label)
    headers = {"Authorization": f"Bearer {cluster.token(4000)}"}
    checks = [*CHECKS, negative_data_rejection] if mode == GenerationMode.NEGATIVE else CHECKS

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        case.call_and_validate(base_url=cluster.url, headers=headers, checks=checks)

    fuzz()


async def test_the_ledger_is_consistent_after_fuzzing(cluster: Cluster) -> None:
    await cluster.check()
