"""The DICOM node under faults: a full spool disk (a real 4 MB tmpfs), a results store locked
by another process, and a dataset over the size limit. In each, an image answered 0x0000 is
reported exactly once (to a pynetdicom Storage SCP standing in for the PACS), under its own
patient, and its spooled copy is never deleted before; what cannot be kept is answered 0xA700
(out of resources), never success."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_support import dcmtk, nih_gray, referenced_image, send
from support.media import radiograph_dicom, untrained_bundle
from support.services import free_port
from test_dicom_node import Sink
from typer.testing import CliRunner

from cxr.cli import app as cli
from cxr.dicom.forward import Destination
from cxr.dicom.listen import build_node
from cxr.dicom.node import NodeOptions
from cxr.results.store import StoreError

WAIT_S = 120  # a hang guard, never a timing assertion
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
FAST_RETRIES = {"port": 0, "allowed_ae": ("PACS",), "workers": 2, "retry_max_s": 0.5}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return untrained_bundle(tmp_path_factory.mktemp("fault-bundle"), 64, seed=5)


@pytest.fixture
def sink():
    running = Sink()
    yield running
    running.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (unmounted at the end)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (root needed): {mounted.stderr.decode()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def make_node(bundle, tmp_path):
    nodes = []

    def make(sink_port: int, spool: Path, **options):
        node = build_node(
            bundle,
            Destination("127.0.0.1", sink_port, "SINK"),
            NodeOptions(**{**FAST_RETRIES, **options}),
            spool=spool,
            db=str(tmp_path / "results.sqlite"),
        )
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:
        node.stop()
        node.store.close()


def radiograph(patient: str, side: int = 1024) -> pydicom.Dataset:
    """A DX of a real NIH radiograph (8 bits, tiled to ``side``² bytes of pixels) for
    ``patient``."""
    data = radiograph_dicom(np.tile(nih_gray(0), (2, 2))[:side, :side], PatientID=patient)
    return pydicom.dcmread(io.BytesIO(data))


def store_status(tmp_path: Path) -> dict[str, str]:
    """SOP Instance UID -> status, read with sqlite3 itself."""
    with sqlite3.connect(tmp_path / "results.sqlite") as connection:
        return dict(connection.execute("SELECT sop_instance_uid, status FROM results"))


def wait_reported(sink: Sink, acknowledged: dict[str, str]) -> None:
    """Wait until every acknowledged image (uid -> patient) has its report, then check each
    has exactly one, under its own patient, and nothing else was reported."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if set(acknowledged) <= {referenced_image(r)[1] for r in sink.reports()}:
            break
        time.sleep(0.1)
    reported = [(referenced_image(r)[1], str(r.PatientID)) for r in sink.reports()]
    assert sorted(reported) == sorted(acknowledged.items())


def wait_for_log(caplog, fragment: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if any(fragment in record.getMessage() for record in caplog.records):
            return
        time.sleep(0.05)
    pytest.fail(f"no log line with {fragment!r}")


def fill(folder: Path, name: str, leave: int = 0) -> Path:
    """Fill ``folder``'s file system up to ``leave`` bytes free (or until it is full)."""
    path = folder / name
    free = shutil.disk_usage(folder).free
    with open(path, "wb") as handle:
        try:
            for _ in range(max(free - leave, 0) // 4096):
                handle.write(b"\0" * 4096)
                handle.flush()
        except OSError:
            pass  # full
    return path


def acknowledged_of(datasets, answers) -> dict[str, str]:
    assert all(status in (SUCCESS, OUT_OF_RESOURCES) for status, _ in answers), answers
    return {
        str(d.SOPInstanceUID): str(d.PatientID)
        for d, (status, _) in zip(datasets, answers)
        if status == SUCCESS
    }


@pytest.mark.slow
def test_full_spool_disk_loses_no_acknowledged_image(sink, small_disk, make_node, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cxr")
    spool = small_disk / "spool"
    ballast = fill(small_disk, "ballast", leave=1_500_000)
    # Small images fit; a 1 MB one does not (it is streamed, then spooled: 2 MB).
    first = make_node(sink.port, spool, workers=0)  # nothing predicted: the spool fills
    small = [radiograph(f"small-{n}|\\é", side=256) for n in range(3)]
    large = [radiograph(f"large-{n}") for n in range(2)]
    datasets = [small[0], large[0], small[1], large[1], small[2]]
    answers = send(first.address[1], datasets)
    acknowledged = acknowledged_of(datasets, answers)
    assert [s for s, _ in answers] == [SUCCESS, OUT_OF_RESOURCES] * 2 + [SUCCESS]
    first.stop()
    incoming = spool / "incoming"
    assert sorted(p.name for p in incoming.iterdir()) == sorted(f"{u}.dcm" for u in acknowledged)
    assert set(store_status(tmp_path)) == set(acknowledged)  # no row for a refused image

    # The disk full: the restarted node cannot write the reports, and keeps the images.
    more_ballast = fill(small_disk, "ballast-2")
    second = make_node(sink.port, spool)
    wait_for_log(caplog, "trying again")
    assert sorted(p.name for p in incoming.iterdir()) == sorted(f"{u}.dcm" for u in acknowledged)
    assert set(store_status(tmp_path).values()) == {"received"}
    assert not sink.reports()

    ballast.unlink()
    more_ballast.unlink()
    wait_reported(sink, acknowledged)
    # With room again, the large images go through.
    answers = send(second.address[1], large)
    assert [s for s, _ in answers] == [SUCCESS, SUCCESS]
    acknowledged.update(acknowledged_of(large, answers))
    wait_reported(sink, acknowledged)
    assert second.wait(lambda: second.counts.sent == len(acknowledged), WAIT_S)
    assert set(store_status(tmp_path).values()) == {"sent"}


@pytest.mark.slow
def test_unreadable_store_at_start_refuses_to_start_and_deletes_nothing(
    bundle, sink, make_node, tmp_path
):
    spool = tmp_path / "spool"
    images = [radiograph(f"kept-{n}", side=256) for n in range(2)]
    first = make_node(sink.port, spool, workers=0)
    assert [s for s, _ in send(first.address[1], images)] == [SUCCESS, SUCCESS]
    first.stop()
    first.store.close()
    database = tmp_path / "results.sqlite"
    intact = database.read_bytes()
    second = build_node(
        bundle,
        Destination("127.0.0.1", sink.port, "SINK"),
        NodeOptions(port=0, allowed_ae=("PACS",)),
        spool=spool,
        db=str(database),
    )
    second.store.engine.dispose()
    database.write_bytes(b"not a database " * 100)  # what a damaged volume could show
    try:
        with pytest.raises(StoreError, match="cannot read results"):
            second.start()
    finally:
        second.stop()
        second.store.close()
    kept = sorted(p.name for p in (spool / "incoming").iterdir())
    assert kept == sorted(f"{d.SOPInstanceUID}.dcm" for d in images)

    database.write_bytes(intact)
    make_node(sink.port, spool)
    wait_reported(sink, {str(d.SOPInstanceUID): str(d.PatientID) for d in images})


LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("COMMIT")
"""


@pytest.mark.slow
def test_locked_store_answers_out_of_resources_and_resumes(sink, make_node, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cxr")
    spool = tmp_path / "spool"
    before = [radiograph(f"before-{n}", side=256) for n in range(2)]
    first = make_node(sink.port, spool, workers=0, store_busy_timeout_s=0.3)
    assert [s for s, _ in send(first.address[1], before)] == [SUCCESS, SUCCESS]
    acknowledged = acknowledged_of(before, [(SUCCESS, "")] * 2)
    first.stop()

    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp_path / "results.sqlite")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        second = make_node(sink.port, spool, store_busy_timeout_s=0.3)
        wait_for_log(caplog, "trying again")  # 'predicted' cannot be written: kept
        during = [radiograph(f"during-{n}", side=256) for n in range(2)]
        answers = send(second.address[1], during)
        assert [s for s, _ in answers] == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        kept = sorted(p.name for p in (spool / "incoming").iterdir())
        assert kept == sorted(f"{u}.dcm" for u in acknowledged)
    finally:
        locker.communicate("\n", timeout=WAIT_S)
    wait_reported(sink, acknowledged)
    assert set(store_status(tmp_path)) == set(acknowledged)  # no row for a refused image

    # Released: the images refused meanwhile go through when sent again.
    answers = send(second.address[1], during)
    acknowledged.update(acknowledged_of(during, answers))
    assert len(acknowledged) == 4
    wait_reported(sink, acknowledged)
    assert second.wait(lambda: second.counts.sent == 4, WAIT_S)


def storescu(port: int, path: Path) -> str:
    done = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", "PACS", "-aec", "CXR", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    return done.stdout + done.stderr


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def wait_listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail("the listener did not start")


@pytest.mark.slow
def test_oversized_dataset_is_refused_without_holding_it(bundle, sink, tmp_path):
    port = free_port()
    errors = tmp_path / "listener.log"
    command = [sys.executable, "-m", "cxr", "dicom", "listen", str(bundle), "--port", str(port)]
    command += ["--forward", f"127.0.0.1:{sink.port}:SINK", "--allow-ae", "PACS"]
    command += ["--spool", str(tmp_path / "spool"), "--db", str(tmp_path / "results.sqlite")]
    with open(errors, "w") as log_file:
        listener = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ}
        )
    try:
        wait_listening(port, listener)
        images = {}
        for name in ("first", "next"):
            dataset = radiograph(f"{name}-patient")
            images[name] = (tmp_path / f"{name}.dcm", dataset)
            dataset.save_as(images[name][0], enforce_file_format=True)
        big = radiograph("big-patient", side=256)
        big.private_block(0x0099, "CXR TEST", create=True).add_new(0x00, "OB", b"\1" * 120_000_000)
        big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
        size = (tmp_path / "big.dcm").stat().st_size
        del big

        assert "Success" in storescu(port, images["first"][0])
        wait_reported(sink, {str(images["first"][1].SOPInstanceUID): "first-patient"})
        before = peak_rss(listener.pid)
        output = storescu(port, tmp_path / "big.dcm")
        assert "Refused: OutOfResources" in output, output
        grown = peak_rss(listener.pid) - before
        assert "Success" in storescu(port, images["next"][0])
        wait_reported(
            sink,
            {str(d.SOPInstanceUID): str(d.PatientID) for _, d in images.values()},
        )
    finally:
        listener.terminate()
        listener.wait(timeout=WAIT_S)
    assert grown < size / 4, f"peak RSS grew by {grown:,} bytes for a {size:,}-byte dataset"
    logged = errors.read_text()
    match = re.search(r"dataset of ([\d,]+) bytes is over the 64 MB limit", logged)
    assert match and int(match.group(1).replace(",", "")) > 120_000_000, logged
    assert not list((tmp_path / "spool" / "incoming").glob("*"))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_listen_refuses_a_bad_dataset_limit_before_loading_the_model(tmp_path, value):
    missing = tmp_path / "no-such-bundle"  # were the model loaded first, this would be the error
    arguments = ["dicom", "listen", str(missing), "--forward", "127.0.0.1:104:PACS"]
    result = CliRunner().invoke(cli, [*arguments, "--max-dataset-mb", value])
    assert result.exit_code != 0, result.output
    assert "--max-dataset-mb" in result.output and "expected a positive number" in result.output
    assert "Traceback" not in result.output


def test_a_pdu_claiming_more_than_accepted_closes_the_connection_unread(
    sink, make_node, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="cxr")
    node = make_node(sink.port, tmp_path / "spool")
    with socket.create_connection(node.address, timeout=WAIT_S) as peer:
        peer.sendall(b"\x04\x00" + struct.pack(">L", 200_000_000) + b"\x00" * 4096)
        try:
            answer = peer.recv(1)  # were the 200 MB awaited, this would hang to WAIT_S
        except ConnectionResetError:
            answer = b""
    assert answer == b""
    wait_for_log(caplog, "a PDU of 200,000,000 bytes is over the")
    image = radiograph("after-the-claim", side=256)
    assert [s for s, _ in send(node.address[1], [image])] == [SUCCESS]
    wait_reported(sink, {str(image.SOPInstanceUID): "after-the-claim"})


@pytest.mark.slow
def test_a_delivery_the_locked_store_cannot_record_is_recorded_later_not_resent(
    make_node, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="cxr")
    port = free_port()  # the destination is down at first: the reports wait in the spool
    node = make_node(port, tmp_path / "spool", store_busy_timeout_s=0.3)
    images = [radiograph(f"delivered-{n}", side=256) for n in range(2)]
    assert [s for s, _ in send(node.address[1], images)] == [SUCCESS, SUCCESS]
    assert node.wait(lambda: set(store_status(tmp_path).values()) == {"predicted"}, WAIT_S)
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp_path / "results.sqlite")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    destination = None
    try:
        assert locker.stdout.readline().strip() == "locked"
        destination = Sink(port)
        wait_for_log(caplog, "was delivered but cannot be recorded yet")
        assert set(store_status(tmp_path).values()) == {"predicted"}
        locker.communicate("\n", timeout=WAIT_S)
        assert node.wait(lambda: set(store_status(tmp_path).values()) == {"sent"}, WAIT_S)
        wait_reported(destination, {str(d.SOPInstanceUID): str(d.PatientID) for d in images})
    finally:
        if locker.poll() is None:
            locker.communicate("\n", timeout=WAIT_S)
        if destination is not None:
            destination.stop()
