"""The HTTP API's contract: ``/openapi.json`` describes every answer ``cxr serve`` gives.

A real ``cxr serve`` process (a tiny untrained bundle, an API key, an SQLite results store) on
a loopback port is tried by tools the project did not write, as an integrator would:

* Schemathesis (its CLI, a fixed seed, a bounded number of examples per operation) generates
  valid and invalid requests from the schema and checks that no answer is a 5xx, that every
  status, content type and body is the one the schema declares, and that invalid data is
  rejected;
* openapi-python-client generates a client from the schema, which uploads a real NIH PNG,
  reads its probabilities (equal to ``cxr predict``'s), and reads typed problems for bad
  uploads and a missing key.

Either tool missing fails the test: they are ``dev`` dependencies, not optional ones.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from support.media import untrained_bundle
from support.results import write_three_instances
from support.services import free_port

KEY = "contract-test-key-0123456789abcdef"
SEED = 27
MAX_EXAMPLES = 80  # per operation and phase
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
NIH_PNG = "00001369_000.png"  # an RGBA NIH image (used by the page test too)
STARTUP_S = 120


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """``cxr serve`` in a child process; yields (base URL, schema path, bundle), then stops."""
    folder = tmp_path_factory.mktemp("contract")
    bundle = untrained_bundle(folder / "bundle", 32)
    key_file = folder / "api.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    store_path = folder / "results.sqlite"
    write_three_instances(str(store_path))  # rows of every status for /v1/results
    port = free_port()
    log = folder / "serve.log"
    command = [
        sys.executable, "-m", "cxr", "serve", str(bundle), "--port", str(port),
        "--backend", "torch", "--device", "cpu", "--api-key-file", str(key_file),
        "--results-db", str(store_path), "--max-upload-mb", "4", "--decode-workers", "1",
        "--request-timeout", "60",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"cxr serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        schema = httpx.get(f"{base}/openapi.json", headers={"X-API-Key": KEY}, timeout=30)
        assert schema.status_code == 200, schema.text
        schema_path = folder / "openapi.json"
        schema_path.write_text(schema.text)
        yield base, schema_path, bundle
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
def test_schemathesis_finds_no_answer_outside_the_schema(service, tmp_path):
    base, schema_path, _ = service
    config = tmp_path / "schemathesis.toml"
    # 413 (over the upload limit) is as much a rejection of invalid data as 400 or 422; the
    # check's default list lacks it because most APIs have no size limit in their schema.
    config.write_text(
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "404", "413", "415", "422"]\n'
    )
    report, har = tmp_path / "report.json", tmp_path / "requests.har"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        str(schema_path), "--url", base, "--checks", ",".join(CHECKS), "--seed", str(SEED),
        "--max-examples", str(MAX_EXAMPLES), "--header", f"X-API-Key: {KEY}",
        "--workers", "1", "--no-color", "--generation-database", "none",
        "--request-timeout", "60", "--report", "json,har", "--report-json-path", str(report),
        "--report-har-path", str(har),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    assert "No issues found" in output, output[-4000:]
    summary = json.loads(report.read_text())
    assert summary["operations"]["tested"] == 4 and summary["test_cases"]["with_failures"] == 0
    # What the service answered, per operation: with the key, so not a run of only 401s.
    answers: Counter[tuple[str, int]] = Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        path = urlsplit(entry["request"]["url"]).path
        answers[(f"{entry['request']['method']} {path}", entry["response"]["status"])] += 1
    for operation in ("GET /healthz", "GET /v1/results", "POST /v1/explain"):
        assert answers[(operation, 200)] > 0, answers
    for operation in ("POST /v1/predict", "POST /v1/explain", "GET /v1/results"):
        assert answers[(operation, 422)] > 0, answers
    assert not [key for key in answers if key[1] >= 500], answers
    assert took < 120, f"schemathesis took {took:.0f} s"
    print(output[-1200:], *sorted(answers.items()), sep="\n")


def generated_client(schema_path: Path, out: Path):
    """The package openapi-python-client generates from ``schema_path``, imported."""
    config = out.parent / "client-config.json"
    # No post-hooks: formatting the generated code with ruff is not what is tested here.
    # image/png (the Grad-CAM overlay) is a file to it only under the generic binary type.
    config.write_text(
        json.dumps(
            {
                "package_name_override": "cxr_generated",
                "post_hooks": [],
                "content_type_overrides": {"image/png": "application/octet-stream"},
            }
        )
    )
    done = subprocess.run(
        [
            sys.executable, "-m", "openapi_python_client", "generate", "--path",
            str(schema_path), "--output-path", str(out / "cxr_generated"), "--meta", "none",
            "--config", str(config),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The schema must need no workaround: the generator warns about what it cannot model.
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("cxr_generated")
    finally:
        sys.path.remove(str(out))


@pytest.mark.slow
def test_a_generated_client_reads_predictions_and_typed_problems(service, tmp_path, nih_dir):
    from cxr.engine.inference import load_predictor, predict_files

    base, schema_path, bundle = service
    package = generated_client(schema_path, tmp_path)
    predict = importlib.import_module("cxr_generated.api.default.predict_v1_predict_post")
    results = importlib.import_module("cxr_generated.api.default.results_v1_results_get")
    models = importlib.import_module("cxr_generated.models")
    types = importlib.import_module("cxr_generated.types")
    client = package.AuthenticatedClient(base_url=base, token=KEY, timeout=httpx.Timeout(60))

    image = nih_dir / "images" / NIH_PNG

    def upload(name: str, data: bytes):
        body = models.BodyPredictV1PredictPost(
            file=types.File(payload=data, file_name=name, mime_type="image/png")
        )
        return predict.sync_detailed(client=client, body=body)

    answer = upload(NIH_PNG, image.read_bytes())
    assert answer.status_code == 200, answer.content[:500]
    prediction = answer.parsed
    assert isinstance(prediction, models.Prediction)
    assert prediction.file == NIH_PNG and (prediction.width, prediction.height) == (1024, 1024)
    probabilities = prediction.probabilities.to_dict()
    predictor = load_predictor(bundle, backend="torch", device="cpu")
    expected = predict_files(predictor, [image]).records()[0]["probabilities"]
    assert list(probabilities) == list(predictor.labels)
    for label, value in expected.items():
        assert abs(probabilities[label] - value) <= 1e-6, (label, probabilities[label], value)

    # The Grad-CAM overlay of a label from the schema's enum.
    explain = importlib.import_module("cxr_generated.api.default.explain_v1_explain_post")
    overlay = explain.sync_detailed(
        client=client,
        body=models.BodyExplainV1ExplainPost(
            file=types.File(payload=image.read_bytes(), file_name=NIH_PNG),
            pathology=models.BodyExplainV1ExplainPostPathology.CARDIOMEGALY,
        ),
    )
    assert overlay.status_code == 200, overlay.content[:500]
    assert overlay.parsed.payload.read().startswith(b"\x89PNG")
    assert overlay.headers["x-pathology"] == "Cardiomegaly"

    # Bad uploads: typed problems, the status repeated in the body.
    for name, data, status in (
        ("notes.png", b"not an image\n", 415),
        ("empty.png", b"", 415),
        ("cut.png", image.read_bytes()[:5000], 422),
    ):
        answer = upload(name, data)
        assert answer.status_code == status, answer.content[:500]
        problem = answer.parsed
        assert isinstance(problem, models.Problem), answer.content[:500]
        assert problem.status == status and problem.detail.startswith(f"{name}: ")
        if status == 422:
            [error] = problem.errors
            assert isinstance(error, models.FieldError) and error.field == "file"

    # Without the key: a typed 401; the results store's rows through their model.
    anonymous = package.Client(base_url=base)
    denied = results.sync_detailed(client=anonymous)
    assert denied.status_code == 401 and isinstance(denied.parsed, models.Problem)
    assert KEY not in denied.content.decode()
    page = results.sync_detailed(client=client, status=models.ResultsV1ResultsGetStatus.SENT)
    assert page.status_code == 200 and isinstance(page.parsed, models.ResultsPage)
    assert [row.sop_instance_uid for row in page.parsed.results] == ["1.2.3.1"]
