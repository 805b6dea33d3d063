"""The DICOM node's associations, driven by dcmtk's own SCUs (storescu, echoscu): the called
AE title, FOR PROCESSING images, two senders racing one SOP Instance UID, connections that
never speak, and a listener that answers before its model is loaded."""

# ruff: noqa: F811 (the node tests' fixtures, imported, are redefined as arguments)

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from dicom_support import nih_gray, send
from test_dicom_node import Sink, bundle, make_node, sink, store_rows  # noqa: F401

from cxr.testing import radiograph_dicom

WAIT_S = 120  # a hang guard, never a timing assertion
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")
    return path


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
