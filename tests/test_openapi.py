"""The OpenAPI document is true to the answers: schemathesis drives a real platform by it.

Every check, the coverage phase (boundaries and each kind of invalid input, operation by operation)
and the fuzzing phase (random valid and invalid requests), against a platform of the test's own with
one app deployed. On failure the assertion shows schemathesis's report: each failure with its curl
line, and the seed; OSLESS_FUZZ_SEED=N runs with another seed, OSLESS_FUZZ_SECONDS=S for longer.
The tests after it pin, one by one, what the fuzzer found.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.platform import EXAMPLES, Platform

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
HOOKS = Path(__file__).with_name("openapi_hooks.py")

# Each exception to "every check on every operation" says why it must be made.
CONFIG = """
hooks = "{hooks}"
headers = {{ Authorization = "Bearer ${{OSLESS_TOKEN}}" }}
# Below a token's request rate (20/s): past it every answer would be a 429, and test nothing.
rate-limit = "15/s"

[[operations]]
# A function's own failure (it raised, or returned what JSON cannot carry) is 500, as documented;
# the example app's function raises on events that are not objects, and the fuzzer sends those.
include-operation-id-regex = "^invoke"
checks.not_a_server_error.expected-statuses = ["1xx", "2xx", "3xx", "4xx", "500"]

[[operations]]
# The keys and types a config takes are in the app's code, which the document cannot know: a
# request of the right shape may still name a key the app does not declare (422).
include-path-regex = "/config(/rollback)?$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
# min <= max cannot be said in JSON Schema: {{"min": 5, "max": 2}} fits it and is refused (422).
include-path-regex = "/scale$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
# A platform role (node, controller, builder) serves every app: limited to one it is refused (422),
# which JSON Schema cannot say of two fields together.
include-path = "/v1/tokens"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
# A node's heartbeat reports URLs on the address it calls from (the SSRF guard, api/nodeaddr.py):
# whether an address is that one depends on the connection, which JSON Schema cannot see (400).
include-path-regex = "^/v1/nodes/[^/]+$"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422", "429"]

[[operations]]
# A path inside a volume: no segment "..", none over 255 bytes, no NUL (400 invalid_path); a pattern
# for that needs look-arounds, which the validators on both sides do not share.
include-path-regex = "/volumes/"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "400", "401", "403", "404", "409", "413", "429", "5xx"
]

[[operations]]
# A profile samples a live instance for its `seconds` (up to 60): past the request timeout here, and
# a run of them would take minutes. tests/test_debug.py drives it.
include-path-regex = "/debug/profile$"
enabled = false

[[operations]]
# The upload: values seen in earlier answers (ids, digests) seldom fit ?app=, and once the fuzzer
# draws them there, so many cases are filtered out that hypothesis's health check gives up.
include-path = "/v1/deploys"
include-method = "POST"
phases.fuzzing.extra-data-sources.responses = false
"""


def test_the_api_answers_as_its_openapi_document_says(tmp_path: Path) -> None:
    # A platform of its own: the fuzzer creates, scales and deletes whatever it can reach.
    platform = Platform(tmp_path / "data").start()
    try:
        platform.deploy(EXAMPLES / "hello")
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG.format(hooks=HOOKS))
        seconds = os.environ.get("OSLESS_FUZZ_SECONDS", "30")
        r = subprocess.run(
            [
                SCHEMATHESIS,
                "--config-file",
                str(config),
                "run",
                f"{platform.api}/openapi.json",
                "--checks",
                "all",
                # Not the stateful phase: the scheduler acts on the same objects between its steps
                # (an instance a step created is gone, as designed, before the next step reads it).
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "100",
                "--max-time",
                seconds,
                # A function call waits up to its timeout (10 s) plus 10 s, e.g. for an instance to wake.
                "--request-timeout",
                "30",
                "--seed",
                os.environ.get("OSLESS_FUZZ_SEED", "1"),
                "--no-color",
            ],
            env={**os.environ, "OSLESS_TOKEN": platform.token, "COLUMNS": "120"},
            cwd=tmp_path,  # its caches (.schemathesis/, which replays past failures first) start empty
            capture_output=True,
            text=True,
            timeout=float(seconds) + 90,
        )
    finally:
        platform.stop()
    assert r.returncode == 0, "\n" + readable(r.stdout + r.stderr)


def readable(report: str) -> str:
    """From schemathesis's first section of errors or failures (each with a curl line) to its summary."""
    found = [i for i in (report.find("=== ERRORS ==="), report.find("=== FAILURES ===")) if i >= 0]
    return report[report.rfind("\n", 0, min(found)) + 1 :] if found else report


def test_every_operation_declares_the_statuses_every_path_can_answer(platform: Platform) -> None:
    doc = platform.http("GET", "/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A token: osless up's admin one, one from osless tokens create, or an app's",
    }
    assert doc["security"] == [{"bearer": []}]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            shared = ["401", "403", "429"] + (["400", "413"] if "requestBody" in op else [])
            for status in shared + [s for s in op["responses"] if s >= "400"]:
                content = op["responses"][status]["content"]
                assert content == {"application/json": {"schema": error}}, (method, path, status)


def test_405_names_every_method_of_the_path(platform: Platform) -> None:
    r = platform.http("OPTIONS", "/v1/apps/ghost")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    assert r.json()["error"]["message"] == "OPTIONS is not allowed here; /v1/apps/ghost answers DELETE, GET"
    r = platform.http("PUT", "/v1/apps/ghost/config")
    assert r.status_code == 405 and r.headers["allow"] == "GET, PATCH"


def test_json_bodies_are_read_as_typed(platform: Platform) -> None:
    def scale(body: dict[str, Any]) -> httpx.Response:
        return platform.http("PUT", "/v1/apps/ghost/scale", json=body)

    for wrong in ({"min": "1"}, {"min": True}, {"min": 1.5}, {"target": False}, {"target": "2"}):
        r = scale(wrong)
        assert r.status_code == 422, (wrong, r.text)
    for right in ({"min": 1.0}, {"target": 2}):  # 1.0 is the integer 1; 2 is a number
        assert scale(right).json()["error"]["code"] == "app_not_found", right


def test_a_node_lease_shorter_than_a_second_is_refused(platform: Platform) -> None:
    # It expired before the write that used it: a 500, LeaseNotFound.
    r = platform.http("PUT", "/v1/nodes/brief", json={"name": "brief", "ttl_s": 1e-300})
    assert r.status_code == 422 and "ttl_s" in r.json()["error"]["message"]
