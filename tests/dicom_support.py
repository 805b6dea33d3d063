"""What the DICOM node's tests share: the inputs (radiographs made from real NIH PNGs, the
real DICOM, and the bad ones), a sending SCU, and a reading of a report's findings that
walks the SR's content tree by the DICOM codes themselves (not through cxr's own reader)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE

from cxr.testing import radiograph_dicom

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DICOM = SHARED / "misc" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
NIH_PNGS = [SHARED / "misc" / "00000001_000.png", SHARED / "misc" / "00027426_000.png"]
PROBABILITY, THRESHOLD = "122157", "122411"  # DCM codes: Probability, Threshold Value
PRESENT = "52101004"  # SNOMED CT: Present
BAD_NAMES = ("lateral", "no-view", "ct-slice", "truncated", "30000x30000")


def nih_gray(index: int = 0) -> np.ndarray:
    with Image.open(NIH_PNGS[index]) as image:
        return np.asarray(image.convert("L"))


def good_inputs() -> dict[str, bytes]:
    """Readable frontal radiographs: DX from real NIH PNGs (8 and 16 bit, MONOCHROME1 and 2)
    and the real CR DICOM (JPEG-compressed)."""
    first, second = nih_gray(0), nih_gray(1)
    wide = (second.astype(np.uint16) * 257) >> 4  # 12 bits of signal in 16-bit words
    return {
        "nih-8bit-mono2": radiograph_dicom(first),
        "nih-16bit-mono2": radiograph_dicom(wide.astype(np.uint16), BitsStored=12, HighBit=11),
        "nih-8bit-mono1": radiograph_dicom(255 - first, photometric="MONOCHROME1"),
        "nih-16bit-mono1": radiograph_dicom(
            (65535 - second.astype(np.uint16) * 257).astype(np.uint16),
            photometric="MONOCHROME1",
            view="AP",
        ),
        "real-cr": REAL_DICOM.read_bytes(),
    }


def bad_inputs() -> dict[str, tuple[pydicom.Dataset, str]]:
    """Instances the node must refuse, each with a fragment of the reason it must give."""
    gray = nih_gray(0)
    truncated = _dataset(radiograph_dicom(gray))
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    huge = _dataset(radiograph_dicom(gray[:64, :64]))
    huge.Rows = huge.Columns = 30000
    return {
        "lateral": (_dataset(radiograph_dicom(gray, view="LL")), "view LL is not frontal"),
        "no-view": (_dataset(radiograph_dicom(gray, view=None)), "view position unknown"),
        "ct-slice": (
            _dataset(
                radiograph_dicom(
                    gray[:256, :256].astype(np.uint16), modality="CT", sop_class=CTImageStorage
                )
            ),
            "modality CT is not a radiograph",
        ),
        "truncated": (truncated, "pixel data is truncated"),
        "30000x30000": (huge, "30000x30000 pixels, more than"),
    }


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def send(port: int, datasets: list[pydicom.Dataset], ae_title: str = "PACS") -> list:
    """C-STORE each dataset over one association; returns each response's (status,
    comment), or None when the association was refused."""
    ae = AE(ae_title=ae_title)
    for sop_class in (
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        CTImageStorage,
    ):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(SecondaryCaptureImageStorage, JPEGBaseline8Bit)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
    if not assoc.is_established:
        return None
    try:
        answers = []
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            answers.append((int(status.Status), str(status.get("ErrorComment", ""))))
        return answers
    finally:
        assoc.release()


def report_findings(report: pydicom.Dataset) -> dict[str, dict]:
    """label -> {probability, threshold, positive}, walking the SR by its codes."""
    findings = {}
    for item in report.ContentSequence:
        if item.ValueType != "CONTAINER":
            continue
        values = {}
        for child in item.ContentSequence:
            concept = child.ConceptNameCodeSequence[0].CodeValue
            if child.ValueType == "NUM":
                key = {PROBABILITY: "probability", THRESHOLD: "threshold"}[concept]
                values[key] = float(child.MeasuredValueSequence[0].FloatingPointValue)
            elif child.ValueType == "CODE" and concept == "121071":  # Finding
                code = child.ConceptCodeSequence[0]
                values["label"] = code.get("CodeValue") or code.get("LongCodeValue")
            elif child.ValueType == "CODE":
                values["positive"] = child.ConceptCodeSequence[0].CodeValue == PRESENT
        findings[values.pop("label")] = values
    return findings


def referenced_image(report: pydicom.Dataset) -> tuple[str, str]:
    """(SOP class, SOP instance) of the report's IMAGE content item."""
    (image,) = [item for item in report.ContentSequence if item.ValueType == "IMAGE"]
    reference = image.ReferencedSOPSequence[0]
    return str(reference.ReferencedSOPClassUID), str(reference.ReferencedSOPInstanceUID)


def text_items(report: pydicom.Dataset) -> dict[str, str]:
    """Concept meaning -> text of the report's TEXT items (the algorithm's identification)."""
    return {
        str(item.ConceptNameCodeSequence[0].CodeMeaning): str(item.TextValue)
        for item in report.ContentSequence
        if item.ValueType == "TEXT"
    }


def dcmtk(tool: str) -> str:
    """The path of dcmtk's ``tool`` (storescu, echoscu, findscu...). pynetdicom installs
    look-alike scripts of the same names into the virtual environment's bin, which comes
    first on PATH: those are pynetdicom, not a tool we did not write, so each candidate on
    PATH must say it is dcmtk (OFFIS) in its --version."""
    import os
    import subprocess

    import pytest

    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / tool
        if not candidate.is_file() or not os.access(candidate, os.X_OK):
            continue
        version = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, timeout=30
        )
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return str(candidate)
    pytest.fail(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")
