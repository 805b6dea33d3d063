"""The service's error model and its schema, through FastAPI's TestClient: every non-2xx answer
is an RFC 9457 problem whose status the route's schema declares, and ``/openapi.json`` says
what each route takes and answers (the contract tests try it against a real process)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support.media import png_bytes
from support.problems import problem_detail

from cxr.engine.inference import load_predictor
from cxr.labels import PATHOLOGIES
from cxr.serve.app import create_app, openapi_schema
from cxr.serve.problems import MEDIA_TYPE, bounded, problem

KEY = "problems-test-key-0123456789"
LIMIT = 100_000
PROBLEM = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


@pytest.fixture(scope="module")
def predictor(untrained_bundle):
    return load_predictor(untrained_bundle, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    app = create_app(predictor=predictor, api_key=KEY, max_upload_bytes=LIMIT, decode_workers=1)
    with TestClient(app, headers={"X-API-Key": KEY}) as client:
        yield client


@pytest.fixture(scope="module")
def schema(client) -> dict:
    return client.get("/openapi.json").json()


def small_png() -> bytes:
    return png_bytes(np.zeros((40, 40), dtype=np.uint8))


def test_every_error_of_every_route_is_a_problem_and_fastapi_s_422_is_gone(schema):
    assert "HTTPValidationError" not in str(schema) and "ValidationError" not in str(schema)
    assert set(schema["paths"]) == {"/healthz", "/v1/predict", "/v1/explain", "/v1/results"}
    declared = {}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            statuses = set()
            for status, response in operation["responses"].items():
                if not status.startswith("2"):
                    assert response["content"] == PROBLEM, (path, status)
                    statuses.add(int(status))
            declared[(method.upper(), path)] = statuses
    uploads = {400, 401, 408, 413, 415, 422, 500, 503}
    assert declared == {
        ("GET", "/healthz"): {500},  # open: no key needed
        ("POST", "/v1/predict"): uploads,
        ("POST", "/v1/explain"): uploads,
        ("GET", "/v1/results"): {401, 404, 422, 500, 503},
    }
    for operation in ("/v1/predict", "/v1/explain"):
        assert "Retry-After" in schema["paths"][operation]["post"]["responses"]["503"]["headers"]
    problem_schema = schema["components"]["schemas"]["Problem"]
    assert set(problem_schema["required"]) == {"title", "status", "detail"}
    assert problem_schema["properties"]["errors"]["anyOf"][0]["items"] == {
        "$ref": "#/components/schemas/FieldError"
    }


def test_the_schema_states_the_request_constraints_and_the_key(schema):
    components = schema["components"]["schemas"]
    explain = components["Body_explain_v1_explain_post"]["properties"]
    assert explain["pathology"]["enum"] == [*PATHOLOGIES, *map(str, range(14))]
    for body in ("Body_explain_v1_explain_post", "Body_predict_v1_predict_post"):
        file = components[body]["properties"]["file"]
        assert file["format"] == "binary" and file["maxLength"] == LIMIT
    encoding = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "image/png" in encoding["multipart/form-data"]["encoding"]["file"]["contentType"]
    parameters = {
        p["name"]: p["schema"] for p in schema["paths"]["/v1/results"]["get"]["parameters"]
    }
    assert parameters["status"]["enum"][:2] == ["receiving", "received"]
    assert parameters["since"]["maxLength"] == 40
    assert (parameters["limit"]["minimum"], parameters["limit"]["maximum"]) == (1, 1000)
    results = schema["paths"]["/v1/results"]["get"]["responses"]["200"]["content"]
    assert results["application/json"]["schema"] == {"$ref": "#/components/schemas/ResultsPage"}
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/healthz"]["get"]["security"] == []


def test_without_a_key_no_401_and_no_security(predictor):
    schema = openapi_schema(predictor=predictor)
    assert "securitySchemes" not in schema["components"] and "security" not in schema
    assert "401" not in schema["paths"]["/v1/predict"]["post"]["responses"]
    # ...and the function gives what the service publishes.
    app = create_app(predictor=predictor, decode_workers=1)
    assert TestClient(app).get("/openapi.json").json() == schema


def test_openapi_schema_from_a_bundle_path(untrained_bundle):
    schema = openapi_schema(untrained_bundle, api_key=KEY)
    assert schema["info"]["title"] == "cxr" and "/v1/predict" in schema["paths"]
    assert "401" in schema["paths"]["/v1/results"]["get"]["responses"]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "says"),
    [
        ("get", "/v1/results", {"headers": {"X-API-Key": "wrong-" + KEY}}, 401, "API key"),
        ("get", "/nowhere", {}, 404, "Not Found"),
        ("put", "/v1/predict", {}, 405, "Method Not Allowed"),
        ("get", "/v1/results", {}, 404, "--results-db"),
        ("post", "/v1/predict", {"files": {"file": ("a.png", b"x" * (LIMIT + 1))}}, 413, "a.png"),
        ("post", "/v1/predict", {"content": b"x" * 300_000}, 413, "request body"),
        ("post", "/v1/predict", {"files": {"file": ("e.png", b"")}}, 415, "e.png: empty"),
        ("post", "/v1/predict", {"data": {"x": "1"}}, 422, "file: missing"),
        ("post", "/v1/explain", {"files": {"file": ("a.png", b"x")}}, 422, "pathology: missing"),
    ],
)
def test_every_error_answer_is_a_problem_the_schema_declares(
    client, schema, method, url, kwargs, status, says
):
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    assert says in problem_detail(response)
    assert KEY not in response.text
    operation = schema["paths"].get(url, {}).get(method)
    if operation is not None:  # no route, or no such method: nothing to declare it in
        assert str(status) in operation["responses"], (url, status)


def test_422_lists_the_fields(client):
    response = client.post("/v1/explain", files={"file": ("a.png", small_png())},
                           data={"pathology": "Heart"})  # fmt: skip
    assert response.status_code == 422
    body = response.json()
    assert body["errors"] == [
        {"field": "pathology", "location": "body", "problem": body["errors"][0]["problem"]}
    ]
    assert body["errors"][0]["problem"].startswith("unknown; choose one of Atelectasis")
    response = client.get("/v1/results", params={"limit": 0})
    assert response.json()["errors"] == [
        {"field": "limit", "location": "query", "problem": "invalid value"}
    ]


def test_hostile_fields_are_bounded_and_escaped(client):
    hostile = "<script>alert(1)</script>é\u202e" + "x" * 20_000
    response = client.post(
        "/v1/explain", files={"file": ("a.png", small_png())}, data={"pathology": hostile}
    )
    assert response.status_code == 422
    detail = problem_detail(response)
    assert len(response.content) < 1500 and "x" * 50 not in detail
    assert "é" not in detail and "\u202e" not in detail  # non-ASCII written escaped
    response = client.post(
        "/v1/predict", files={"file": ("<b>évil</b>" + "y" * 900 + ".png", b"junk")}
    )
    assert response.status_code == 415 and len(response.content) < 1500
    assert "<" not in problem_detail(response)  # the name is sanitised, its length capped


def test_problem_bodies_are_bounded_whatever_the_message():
    body = problem(503, "a\x00b\x1b" + "z" * 5000)
    assert body["title"] == "Service Unavailable" and body["type"] == "about:blank"
    assert len(body["detail"]) == 1000 and body["detail"].startswith("a\\x00b\\x1b")
    assert bounded("fine") == "fine"
