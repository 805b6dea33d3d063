"""The DICOM node's associations, driven by dcmtk's own SCUs (storescu, echoscu): the called
AE title, FOR PROCESSING images, two senders racing one SOP Instance UID, connections that
never speak, and a listener that answers before its model is loaded."""

# ruff: noqa: F811 (the node tests' fixtures, imported, are redefined as arguments)

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_support import dcmtk, nih_gray, referenced_image, report_findings, send
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from support.media import radiograph_dicom
from support.services import free_port
from test_dicom_node import (  # noqa: F401
    Sink,
    bundle,
    make_node,
    reference_probabilities,
    sink,
    store_rows,
)

from cxr.dicom.metrics import serve_metrics

WAIT_S = 120  # a hang guard, never a timing assertion
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
UID_CONFLICT = "SOP Instance UID already received for another patient"  # the status we chose


def storescu(port: int, files: list[Path], *, called: str = "CXR", calling: str = "PACS"):
    """dcmtk's storescu sending ``files`` over one association; its completed process."""
    command = [dcmtk("storescu"), "-aet", calling, "-aec", called, "-ta", "30", "-ts", "30"]
    return subprocess.run(
        [*command, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )


def image_file(folder: Path, name: str = "image", **attributes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    path.write_bytes(radiograph_dicom(nih_gray(0), **attributes))
    return path


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.slow
def test_a_wrong_called_ae_title_is_rejected(sink, make_node, tmp_path):
    node = make_node(sink.port).start()
    image = image_file(tmp_path / "in")
    wrong = storescu(node.address[1], [image], called="WRONG")
    assert wrong.returncode != 0
    assert "reason: called ae title not recognized" in wrong.stderr.lower(), wrong.stderr
    right = storescu(node.address[1], [image])
    assert right.returncode == 0, right.stderr
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)
    assert node.counts.rejected == {"called AE title not recognised": 1}
    # The rejected association left no row; the image sent afterwards has one.
    assert [(r["sop_instance_uid"], r["status"]) for r in store_rows(tmp_path)] == [
        (uid_of(image), "sent")
    ]


@pytest.mark.slow
def test_any_called_ae_title_when_asked(sink, make_node, tmp_path):
    node = make_node(sink.port, accept_any_called_ae=True).start()
    image = image_file(tmp_path / "in")
    answer = storescu(node.address[1], [image], called="ANYTHING")
    assert answer.returncode == 0, answer.stderr
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)
    assert not node.counts.rejected


def test_a_calling_ae_title_not_allowed_is_rejected_without_a_row(sink, make_node, tmp_path):
    node = make_node(sink.port).start()
    image = image_file(tmp_path / "in")
    refused = storescu(node.address[1], [image], calling="INTRUDER")
    assert refused.returncode != 0
    assert "reason: calling ae title not recognized" in refused.stderr.lower(), refused.stderr
    assert node.counts.rejected == {"calling AE title not recognised": 1}
    assert store_rows(tmp_path) == []


def test_for_processing_images_are_refused_and_the_association_goes_on(sink, make_node, tmp_path):
    node = make_node(sink.port).start()
    by_intent = pydicom.dcmread(
        io.BytesIO(radiograph_dicom(nih_gray(0), PresentationIntentType="FOR PROCESSING"))
    )
    by_class = pydicom.dcmread(
        io.BytesIO(radiograph_dicom(nih_gray(1), sop_class=DX_FOR_PROCESSING))
    )
    good = pydicom.dcmread(io.BytesIO(radiograph_dicom(nih_gray(1))))
    answers = send(node.address[1], [by_intent, by_class, good])
    assert [status for status, _ in answers] == [0xC000, 0xC000, 0x0000]
    for _, comment in answers[:2]:
        assert "FOR PROCESSING" in comment and "FOR PRESENTATION" in comment
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)
    rows = {r["sop_instance_uid"]: r for r in store_rows(tmp_path)}
    for refused in (by_intent, by_class):
        assert rows[str(refused.SOPInstanceUID)]["status"] == "refused"
        assert "FOR PROCESSING" in rows[str(refused.SOPInstanceUID)]["reason"]
    assert rows[str(good.SOPInstanceUID)]["status"] == "sent"


def _store_at_once(port: int, dataset: pydicom.Dataset, barrier: threading.Barrier, answers):
    """One association opened, then (with the other sender) one C-STORE at the same moment."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT_S
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
    try:
        barrier.wait(timeout=WAIT_S)
        status = assoc.send_c_store(dataset)
        answers[str(dataset.PatientID)] = (int(status.Status), str(status.get("ErrorComment", "")))
    finally:
        assoc.release()


@pytest.mark.slow
def test_two_senders_racing_one_uid_first_write_wins(bundle, sink, make_node, tmp_path):
    rounds = 8
    node = make_node(sink.port, patient_ids="keep").start()
    # Each patient's image has its own pixels, so a report tells which copy was spooled.
    pixels = {"A": nih_gray(0), "B": nih_gray(1)}
    expected = reference_probabilities(
        bundle, {p: radiograph_dicom(g) for p, g in pixels.items()}, tmp_path / "reference"
    )
    expected = dict(zip(pixels, expected.values()))
    winners = {}
    for n in range(rounds):
        uid = generate_uid()
        copies = {
            p: pydicom.dcmread(
                io.BytesIO(radiograph_dicom(g, SOPInstanceUID=uid, PatientID=f"{p}-{n}"))
            )
            for p, g in pixels.items()
        }
        answers, barrier = {}, threading.Barrier(2)
        senders = [
            threading.Thread(target=_store_at_once, args=(node.address[1], c, barrier, answers))
            for c in copies.values()
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(WAIT_S)
        statuses = sorted(answers.values())
        assert statuses == [(0x0000, ""), (0xC000, UID_CONFLICT)], statuses
        winner = next(p for p in pixels if answers[f"{p}-{n}"][0] == 0x0000)
        winners[uid] = (winner, copies[winner])

    assert node.wait(lambda: node.counts.sent == rounds, WAIT_S)
    rows = {r["sop_instance_uid"]: r for r in store_rows(tmp_path)}
    assert len(rows) == rounds
    reports = {referenced_image(r)[1]: r for r in sink.reports()}
    assert sorted(reports) == sorted(winners) and len(sink.reports()) == rounds
    for uid, (winner, dataset) in winners.items():
        assert rows[uid]["patient_ref"] == dataset.PatientID  # the row is the winner's
        assert reports[uid].PatientID == dataset.PatientID  # the SR too
        findings = report_findings(reports[uid])  # and the spooled pixels were the winner's
        got = [findings[label]["probability"] for label in node.model.labels]
        np.testing.assert_allclose(got, expected[winner], rtol=0, atol=1e-9)

    # A resend from the winner's own patient is the same image: acknowledged, one row.
    uid, (_, dataset) = next(iter(winners.items()))
    assert send(node.address[1], [dataset]) == [(0x0000, "")]
    assert len(store_rows(tmp_path)) == rounds


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the metrics endpoint's text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.slow
def test_idle_connections_do_not_lock_senders_out(sink, make_node, tmp_path):
    limit = 2
    node = make_node(sink.port, max_associations=limit, first_pdu_timeout_s=5.0).start()
    metrics = serve_metrics(node, 0)
    image = image_file(tmp_path / "in")
    idle: list[socket.socket] = []
    try:
        # Connections that never send an A-ASSOCIATE-RQ fill every association slot...
        for _ in range(10):  # (until storescu has met them: a slow start may miss them)
            idle += [socket.create_connection(node.address, timeout=WAIT_S) for _ in range(3)]
            first = storescu(node.address[1], [image])
            if first.returncode != 0:
                break
        assert "local limit exceeded" in first.stderr.lower(), first.stderr
        # ...until ARTIM closes them: then a real sender gets through.
        deadline = time.monotonic() + WAIT_S  # a hang guard
        while (answer := storescu(node.address[1], [image])).returncode != 0:
            assert time.monotonic() < deadline, answer.stderr
            time.sleep(0.5)
        for connection in idle:  # the node closed each of them
            assert connection.recv(1) == b""
    finally:
        for connection in idle:
            connection.close()
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)
    assert [(r["sop_instance_uid"], r["status"]) for r in store_rows(tmp_path)] == [
        (uid_of(image), "sent")
    ]
    samples = scrape(metrics.server_address[1])
    metrics.shutdown()
    reason = (("reason", "too many associations (local limit exceeded)"),)
    assert samples[("cxr_dicom_associations_rejected_total", reason)] >= 1
    assert samples[("cxr_dicom_received_total", ())] == 1
    assert samples[("cxr_dicom_sent_total", ())] == 1
    assert samples[("cxr_dicom_queue_depth", (("stage", "prediction"),))] == 0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S  # a hang guard
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
        time.sleep(0.2)


def held_bundle(bundle: Path, folder: Path) -> Path:
    """A copy of ``bundle`` whose model.json is a named pipe: the listener's model cannot load
    until :func:`release_bundle` writes it (no hook in the library, no timing)."""
    folder.mkdir()
    for item in bundle.iterdir():
        if item.is_file() and item.name != "model.json":
            shutil.copy2(item, folder / item.name)
    os.mkfifo(folder / "model.json")
    return folder


def release_bundle(bundle: Path, held: Path) -> None:
    """Let the loader, waiting in its read of model.json, have the real description."""
    pipe = held / "model.json"
    opened: list[int] = []

    def reader_waits() -> bool:  # non-blocking: ENXIO until the loader opens the pipe
        try:
            opened.append(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        return bool(opened)

    wait_for(reader_waits, "the loader reading model.json")
    text = (bundle / "model.json").read_bytes()
    (held / "model.json.real").write_bytes(text)
    os.replace(held / "model.json.real", pipe)  # any later read gets a plain file
    os.set_blocking(opened[0], True)
    with os.fdopen(opened[0], "wb") as writer:
        writer.write(text)


@pytest.mark.slow
def test_the_listener_answers_while_its_model_loads(bundle, sink, tmp_path):
    port = free_port()
    model = held_bundle(bundle, tmp_path / "model")
    command = [sys.executable, "-m", "cxr", "dicom", "listen", str(model), "--port", str(port)]
    command += ["--forward", f"127.0.0.1:{sink.port}:SINK", "--allow-ae", "PACS"]
    command += ["--spool", str(tmp_path / "spool"), "--db", str(tmp_path / "results.sqlite")]
    log = tmp_path / "listener.log"
    with log.open("w") as handle:  # a file, not a pipe: its logging can never block it
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "listening on" in log.read_text() or process.poll() is not None, "port")
        assert process.poll() is None, log.read_text()
        # The model cannot have loaded yet (its description is held back): C-ECHO and
        # C-STORE are answered all the same, and the image waits in the spool.
        image = image_file(tmp_path / "in")
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aet", "PACS", "-aec", "CXR", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert echo.returncode == 0, echo.stderr
        stored = storescu(port, [image])
        assert stored.returncode == 0, stored.stderr
        assert "model ready" not in log.read_text()
        assert [r["status"] for r in store_rows(tmp_path)] == ["received"]
        release_bundle(bundle, model)
        wait_for(lambda: len(sink.reports()) == 1, "the report")
        assert referenced_image(sink.reports()[0])[1] == uid_of(image)
        wait_for(lambda: "model ready" in log.read_text(), "model ready")
        text = log.read_text()
        assert text.index("listening on") < text.index("model ready"), text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(WAIT_S)
    assert process.returncode == 0, log.read_text()
    assert [r["status"] for r in store_rows(tmp_path)] == ["sent"]


@pytest.mark.slow
def test_a_silent_association_is_aborted_and_the_next_sender_gets_its_slot(
    sink, make_node, tmp_path
):
    node = make_node(sink.port, max_associations=1, idle_timeout_s=1.0).start()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT_S  # the sender waits
    silent = ae.associate("127.0.0.1", node.address[1], ae_title="CXR")
    assert silent.is_established
    wait_for(lambda: not silent.is_alive(), "the node ending the silent association")
    assert silent.is_aborted  # A-ABORT from the node, not a release
    image = image_file(tmp_path / "in")
    # The only slot is free again once the node's association thread has ended.
    deadline = time.monotonic() + WAIT_S  # a hang guard
    while (answer := storescu(node.address[1], [image])).returncode != 0:
        assert "local limit exceeded" in answer.stderr.lower(), answer.stderr
        assert time.monotonic() < deadline, answer.stderr
        time.sleep(0.2)
    assert node.wait(lambda: node.counts.sent == 1, WAIT_S)
    assert [r["status"] for r in store_rows(tmp_path)] == ["sent"]


@pytest.mark.slow
def test_a_model_that_cannot_load_stops_the_listener_with_an_error(bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model.json").write_text('{"labels": ')
    command = [sys.executable, "-m", "cxr", "dicom", "listen", str(broken)]
    command += ["--port", str(free_port()), "--forward", "127.0.0.1:1:SINK"]
    command += ["--spool", str(tmp_path / "spool"), "--db", str(tmp_path / "results.sqlite")]
    ended = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S)
    assert ended.returncode != 0
    assert "the model cannot be loaded" in ended.stderr and "model.json" in ended.stderr


@pytest.mark.slow
def test_a_query_is_not_served_and_the_node_goes_on(sink, make_node, tmp_path):
    """The node is a Storage SCP only: dcmtk's findscu finds no presentation context."""
    node = make_node(sink.port).start()
    command = [dcmtk("findscu"), "-S", "-aet", "PACS", "-aec", "CXR"]
    command += ["-k", "QueryRetrieveLevel=STUDY", "127.0.0.1", str(node.address[1])]
    query = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert query.returncode != 0
    assert "no acceptable presentation contexts" in query.stderr.lower(), query.stderr
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "PACS", "-aec", "CXR", "127.0.0.1", str(node.address[1])],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert echo.returncode == 0, echo.stderr
    assert store_rows(tmp_path) == []


@pytest.mark.slow
def test_the_listener_opens_its_port_without_importing_pytorch():
    """PyTorch's import takes seconds: the listener's modules leave it to the model loader,
    which runs once the port is open (a fresh interpreter, so no other test's import counts)."""
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, cxr.cli.dicom, cxr.dicom.listen, cxr.dicom.metrics; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
