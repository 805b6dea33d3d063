"""MkDocs hook: the HTTP API reference, written at build time from the real service.

An untrained bundle (seeded, 64 px) is written to a temporary folder, the FastAPI app of
``cxr serve`` is created on it (``cxr.serve.app.create_app``, nothing served), and its OpenAPI
schema becomes ``reference/http-api.md`` (routes, parameters, request bodies, responses) and
``reference/openapi.json``. The page follows the code: nothing in it is written by hand.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mkdocs.structure.files import File

PAGE = "reference/http-api.md"
SCHEMA = "reference/openapi.json"


def openapi_schema() -> tuple[dict, list[str]]:
    """The OpenAPI schema of ``cxr serve``'s app on an untrained bundle, and the routes the
    schema leaves out (``GET /``, ``/metrics``...) as ``METHOD path``."""
    import torch

    from cxr.model.bundle import BundleMeta, save_bundle
    from cxr.model.network import build_model
    from cxr.serve.app import create_app

    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "model"
        torch.manual_seed(0)
        save_bundle(bundle, build_model(), BundleMeta(image_size=64, normalization="imagenet"))
        service = create_app(bundle, backend="torch", device="cpu")
        hidden = [
            f"{method} {route.path}"
            for route in service.routes
            if not getattr(route, "include_in_schema", True)
            for method in sorted(getattr(route, "methods", None) or {"GET"})
            if method != "HEAD"
        ]
        return service.openapi(), hidden


def _type(schema: dict, spec: dict) -> str:
    if "$ref" in schema:
        return _ref_name(schema["$ref"])
    if "anyOf" in schema:
        return " or ".join(_type(part, spec) for part in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), spec)}"
    if schema.get("format") == "binary" or schema.get("contentMediaType"):
        return "file"
    if "enum" in schema:
        return f"{kind}: " + ", ".join(f"`{value}`" for value in schema["enum"])
    return kind


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _resolve(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][_ref_name(schema["$ref"])]
    return schema


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _limits(schema: dict) -> str:
    parts = []
    for key, word in (("minimum", "min"), ("maximum", "max"), ("default", "default")):
        if key in schema:
            parts.append(f"{word} {json.dumps(schema[key])}")
    return f" ({', '.join(parts)})" if parts else ""


def markdown(spec: dict, hidden: list[str]) -> str:
    """The reference page for ``spec``; ``hidden``: the routes outside the schema."""
    info = spec["info"]
    lines = [
        "# HTTP API",
        "",
        f"`cxr serve` answers these routes (OpenAPI {spec['openapi']}, {info['title']} "
        f"{info['version']}). This page is generated when the site is built, from the schema of "
        "the service itself (`cxr.serve.app.create_app`), so it follows the code; the running "
        "service shows the same at `/docs` and `/openapi.json`, and the schema is "
        "[openapi.json](openapi.json). Routes the schema leaves out: "
        + ", ".join(f"`{route}`" for route in hidden)
        + ". The limits' status codes (401, 408, 413, 415, 503) and how to run and secure the "
        "service: [Serve over HTTP](../how-to/serve.md).",
        "",
    ]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            lines += [f"## {method.upper()} `{path}`", ""]
            if op.get("summary"):
                lines += [f"**{op['summary']}.** {op.get('description', '')}".rstrip(), ""]
            params = op.get("parameters", [])
            if params:
                lines += [
                    "| parameter | in | type | required | description |",
                    "|---|---|---|---|---|",
                ]
                for p in params:
                    schema = p.get("schema", {})
                    lines.append(
                        f"| `{p['name']}` | {p['in']} | {_cell(_type(schema, spec))}"
                        f"{_cell(_limits(schema))} | {'yes' if p.get('required') else 'no'} | "
                        f"{_cell(p.get('description', schema.get('description', '')))} |"
                    )
                lines.append("")
            body = op.get("requestBody")
            if body:
                for content_type, content in body.get("content", {}).items():
                    schema = _resolve(content.get("schema", {}), spec)
                    required = set(schema.get("required", []))
                    lines += [
                        f"Request body: `{content_type}`"
                        f"{' (required)' if body.get('required') else ''}.",
                        "",
                    ]
                    fields = schema.get("properties", {})
                    if fields:
                        lines += ["| field | type | required | description |", "|---|---|---|---|"]
                        for name, field in fields.items():
                            lines.append(
                                f"| `{name}` | {_cell(_type(field, spec))}{_cell(_limits(field))}"
                                f" | {'yes' if name in required else 'no'} | "
                                f"{_cell(field.get('description', ''))} |"
                            )
                        lines.append("")
            lines += ["| status | description | content |", "|---|---|---|"]
            for status, response in op.get("responses", {}).items():
                kinds = ", ".join(f"`{kind}`" for kind in response.get("content", {})) or "-"
                lines.append(f"| {status} | {_cell(response.get('description', ''))} | {kinds} |")
            lines.append("")
    lines += [
        "## The schema",
        "",
        '??? note "openapi.json"',
        "",
        "    ```json",
        *("    " + line for line in json.dumps(spec, indent=2).splitlines()),
        "    ```",
        "",
    ]
    return "\n".join(lines)


def on_files(files, config):
    spec, hidden = openapi_schema()
    files.append(File.generated(config, PAGE, content=markdown(spec, hidden)))
    files.append(File.generated(config, SCHEMA, content=json.dumps(spec, indent=2) + "\n"))
    return files
