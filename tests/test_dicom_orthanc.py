"""The round trip through a real PACS: Orthanc (Debian's package, its own configuration and
storage in a temporary folder, loopback ports) receives the reports of ``cxr dicom listen``
(the command, in its own process), and its REST API shows one SR per accepted image whose
probabilities equal ``cxr predict`` (the command) on the same file."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from dicom_support import bad_inputs, good_inputs, referenced_image, report_findings, send
from support.media import untrained_bundle
from support.services import free_port, running_orthanc

pytestmark = pytest.mark.slow
WAIT_S = 300  # hang guards only


def start_listener(bundle: Path, orthanc, folder: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cxr", "dicom", "listen", str(bundle)]
    command += ["--forward", f"127.0.0.1:{orthanc.dicom_port}:{orthanc.ae_title}"]
    command += ["--port", str(port), "--allow-ae", "PACS", "--workers", "2"]
    command += ["--spool", str(folder / "spool"), "--db", str(folder / "results.sqlite")]
    log = folder / "listener.log"
    with log.open("w") as handle:  # a file, not a pipe: its logging can never block it
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    # The listening line comes once the port is open.
    wait_until(lambda: "listening on" in log.read_text() or process.poll() is not None, "start")
    assert process.poll() is None, log.read_text()
    return process


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {WAIT_S} s")


def orthanc_reports(orthanc) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{found['ID']}/file")))
        for found in orthanc.instances(modality="SR")
    ]


def cxr_predict(bundle: Path, inputs: dict[str, bytes], folder: Path) -> dict[str, dict]:
    """SOP Instance UID -> probabilities, from the ``cxr predict`` command's JSON."""
    folder.mkdir()
    uids = {}
    for name, data in inputs.items():
        path = folder / f"{name}.dcm"
        path.write_bytes(data)
        uids[str(path)] = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    out = folder / "predictions.json"
    command = [sys.executable, "-m", "cxr", "predict", str(bundle), str(folder), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=WAIT_S)
    records = json.loads(out.read_text())["predictions"]
    return {uids[r["file"]]: r["probabilities"] for r in records}


def test_reports_reach_orthanc_equal_to_cxr_predict(tmp_path):
    bundle = untrained_bundle(tmp_path / "bundle", 64, seed=5)
    good, bad = good_inputs(), bad_inputs()
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        port = free_port()
        listener = start_listener(bundle, orthanc, tmp_path, port)
        try:
            datasets = [pydicom.dcmread(io.BytesIO(data)) for data in good.values()]
            # Bad ones between the good ones, on one association: each refused, the rest go on.
            mixed = [datasets[0], *[d for d, _ in bad.values()], *datasets[1:]]
            answers = send(port, mixed)
            assert send(port, datasets[:1], ae_title="STRANGER") is None
            wait_until(lambda: len(orthanc.instances(modality="SR")) >= len(good), "reports")
        finally:
            listener.send_signal(signal.SIGTERM)
            listener.wait(timeout=WAIT_S)
        output = (tmp_path / "listener.log").read_text()
        assert listener.returncode == 0, output
        assert "stopped: 5 received, 5 refused, 5 sent, 0 failed" in output
        reports = orthanc_reports(orthanc)

    statuses = [status for status, _ in answers]
    assert statuses == [0x0000] + [0xC000] * len(bad) + [0x0000] * (len(good) - 1)
    sources = Counter(referenced_image(r)[1] for r in reports)
    assert sources == Counter(str(d.SOPInstanceUID) for d in datasets)  # one SR per image

    expected = cxr_predict(bundle, good, tmp_path / "files")
    for report in reports:
        findings = report_findings(report)
        reference = expected[referenced_image(report)[1]]
        assert list(findings) == list(reference)  # the bundle's labels, in its order
        for label, value in reference.items():
            assert findings[label]["probability"] == pytest.approx(value, abs=1e-9)

    with sqlite3.connect(tmp_path / "results.sqlite") as connection:
        rows = connection.execute(
            "SELECT sop_instance_uid, status, reason, calling_ae FROM results"
        ).fetchall()
    by_uid = {uid: (status, reason) for uid, status, reason, _ in rows}
    for dataset in datasets:
        assert by_uid[str(dataset.SOPInstanceUID)] == ("sent", None)
    for dataset, reason in bad.values():
        status, stored = by_uid[str(dataset.SOPInstanceUID)]
        assert status == "refused" and reason in stored
    # The rejected association: a log line with its reason, no results row.
    assert not [r for r in rows if r[3] == "STRANGER"]
    assert "from 'STRANGER' to 'CXR' rejected: calling AE title not recognised" in output
