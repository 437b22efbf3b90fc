"""The OpenAPI document (`/openapi.json`), true to the answers: what every path shares is added here.

Routes declare what only they answer (`responses=errors.responses(404, 409)`); this adds, to every
operation, what the layers in front of all routes answer: 401 without a valid bearer token, 403 for
a token whose role or app does not reach that far, 429 past the token's request rate, and, where
a body is read, 400 for a body that is not JSON and 413 for one over the limit. FastAPI's own 422
schema is swapped for the one error body, which is what the validation handler answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from osless.api.errors import ErrorBody, responses
from osless.api.models import NDJSON, DeployLogEnd, LogRecord, WatchEvent

__all__ = ["DEPLOY_LOG", "LOG", "WATCHABLE", "install_openapi"]

EVERY_PATH = (401, 403, 429)
WITH_A_BODY = (400, 413)
_FASTAPI_422 = ("HTTPValidationError", "ValidationError")
# The lines of the NDJSON streams, which no response_model names.
_LINES: tuple[type[BaseModel], ...] = (WatchEvent, LogRecord, DeployLogEnd)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _stream(description: str, *lines: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    schema = _ref(lines[0]) if len(lines) == 1 else {"anyOf": [_ref(m) for m in lines]}
    return {200: {"description": description, "content": {NDJSON: {"schema": schema}}}}


# `responses=` of a list that `watch=true` turns into a stream of events (NDJSON, one per line).
WATCHABLE = _stream("The items; with watch=true, the events after `revision`, one per line", WatchEvent)
LOG = _stream("Log records, one per line", LogRecord)
DEPLOY_LOG = _stream("Log records, one per line, then the deploy as it ended", LogRecord, DeployLogEnd)


def install_openapi(app: FastAPI) -> None:
    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in _FASTAPI_422:
        schemas.pop(name, None)
    models: tuple[type[BaseModel], ...] = (ErrorBody, *_LINES)
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in schema.pop("$defs", {}).items():
            schemas.setdefault(name, nested)  # FastAPI's own take on a shared model wins
        schemas[model.__name__] = schema
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token: osless up's admin one, one from osless tokens create, or an app's",
        }
    }
    doc["security"] = [{"bearer": []}]
    for operations in doc.get("paths", {}).values():
        for op in operations.values():
            answers = op.setdefault("responses", {})
            common = EVERY_PATH + (WITH_A_BODY if "requestBody" in op else ())
            for status, response in responses(422, *common).items():
                if status == 422 and "422" not in answers:
                    continue  # only routes that validate something answer 422
                if status == 422 or str(status) not in answers:
                    answers[str(status)] = response
    return doc
