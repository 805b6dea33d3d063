"""The service's one error model: RFC 9457 problem details (``application/problem+json``).

Every answer that is not 2xx, from a route, a validation failure, the body limits, the body
timeout, the API key check or an unexpected failure, is a :class:`Problem`: ``type``
(``about:blank``: the status says what kind of problem it is), ``title`` (the status' phrase),
``status``, ``detail`` (one line for people) and, on 422, ``errors``: the fields at fault
(:class:`FieldError`). Problem details are the IETF standard for HTTP API errors: API gateways,
generated clients and HTTP libraries know the media type, and its ``detail`` member keeps the
``{"detail": "..."}`` that earlier clients of this service read.

:func:`error_responses` is the one table the routes' ``responses=`` come from, and
:func:`add_problem_schemas` puts the models in the OpenAPI schema, so the schema and the
answers cannot drift apart. Nothing a client sent is repeated unbounded: ``detail`` and each
field's text are cut to a fixed length, and control characters are escaped.
"""

from __future__ import annotations

import http
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

MEDIA_TYPE = "application/problem+json"
# Long enough for every message the service writes (a list of 14 labels is ~250 characters);
# short enough that no error can be used to reflect a large input back.
MAX_DETAIL_CHARS = 1000
MAX_FIELD_CHARS = 60
MAX_FIELD_ERRORS = 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SCHEMA_REF = "#/components/schemas/{model}"

# What each status means for this service, in the schema's response descriptions.
DESCRIPTIONS = {
    400: "Malformed request (e.g. an invalid Content-Length header).",
    401: "Missing or wrong API key (only when the service runs with --api-key-file).",
    404: "Nothing here (for /v1/results: the service runs without --results-db).",
    408: "The request body stalled: no part of it arrived within the body timeout.",
    413: "The upload is larger than the upload limit, or the image has more pixels or needs "
    "more memory to decode than the service allows.",
    415: "The upload is empty or not a PNG, JPEG or DICOM image (judged by its bytes).",
    422: "A field is missing or invalid, or the image cannot be decoded; `errors` lists the "
    "fields.",
    500: "An unexpected failure on the server (logged there; the answer names only its kind).",
    501: "Grad-CAM is not available: the service runs an ONNX file without the model bundle.",
    503: "Busy, shutting down, past the request's time limit, or the results store cannot be "
    "read; retry after the Retry-After header's seconds.",
}


class FieldError(BaseModel):
    """One field at fault in a 422 answer."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="The field's name (e.g. file, pathology, since).")
    location: Literal["body", "query", "header", "path", "request"] = Field(
        description="Where the field is: the form body, the query string, ..."
    )
    problem: str = Field(description="What is wrong with it, in words of the service's own.")


class Problem(BaseModel):
    """An RFC 9457 problem details object, the body of every non-2xx answer."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        "about:blank",
        description="A URI for the kind of problem; about:blank: the status code says it.",
    )
    title: str = Field(description="The HTTP status' phrase (e.g. Payload Too Large).")
    status: int = Field(ge=400, le=599, description="The HTTP status code, repeated.")
    detail: str = Field(
        max_length=MAX_DETAIL_CHARS,
        description="What went wrong with this request, for people; never a server path or a "
        "secret.",
    )
    errors: list[FieldError] | None = Field(
        None, description="On 422 only: the fields at fault, at most 10."
    )


def bounded(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_error(field: str, location: str, problem: str) -> FieldError:
    """A :class:`FieldError`; a field name that is not a plain identifier (it may come from
    the client's form) becomes ``request``, and ``problem`` is bounded."""
    field = field if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,59}", field or "") else "request"
    if location not in ("body", "query", "header", "path"):
        location = "request"
    # 300: room for the list of a bundle's labels (CheXNet's 14 take about 200 characters).
    return FieldError(field=field, location=location, problem=bounded(problem, 300))


def problem(status: int, detail: str, *, errors: list[FieldError] | None = None) -> dict[str, Any]:
    """The JSON body of a problem with ``status``."""
    try:
        title = http.HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = Problem(
        title=title,
        status=status,
        detail=bounded(detail),
        errors=None if errors is None else list(errors)[:MAX_FIELD_ERRORS],
    )
    return body.model_dump(exclude_none=True)


def problem_response(
    status: int,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An ``application/problem+json`` answer (what every error handler and middleware sends)."""
    if status == 422 and not errors:
        errors = [field_error("request", "request", "invalid")]
    return JSONResponse(
        problem(status, detail, errors=errors), status, headers=headers, media_type=MEDIA_TYPE
    )


class InvalidField(Exception):
    """A 422 for one field, raised by the routes (``detail`` is the whole message)."""

    def __init__(self, field: str, location: str, detail: str, problem: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = [field_error(field, location, problem or detail)]


def error_responses(*statuses: int, retry_after: bool = True) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route for ``statuses``: each a :class:`Problem` as
    ``application/problem+json``, 503 with its ``Retry-After`` header."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": DESCRIPTIONS.get(status, http.HTTPStatus(status).phrase),
            "content": {MEDIA_TYPE: {"schema": {"$ref": SCHEMA_REF.format(model="Problem")}}},
        }
        if status == 503 and retry_after:
            response["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again.",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {
                    "description": "The Basic challenge (for a browser's login dialog).",
                    "schema": {"type": "string"},
                }
            }
        responses[status] = response
    return responses


def add_problem_schemas(schema: dict[str, Any]) -> dict[str, Any]:
    """Put :class:`Problem` and :class:`FieldError` into ``schema``'s components (the routes
    refer to them by ``$ref``) and drop FastAPI's own validation error models, which no
    answer of this service uses."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    generated = Problem.model_json_schema(ref_template=SCHEMA_REF, mode="serialization")
    components.update(generated.pop("$defs", {}))
    components["Problem"] = generated
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
