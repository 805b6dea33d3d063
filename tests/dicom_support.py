"""What the DICOM node's tests share: the inputs (radiographs made from real NIH PNGs, the
real DICOM, and the bad ones), a sending SCU, and a reading of a report's findings that
walks the SR's content tree by the DICOM codes themselves (not through cxr's own reader)."""

from __future__ import annotations

import io
import urllib.parse
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
from support.media import radiograph_dicom

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DICOM = SHARED / "misc" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
NIH_PNGS = [SHARED / "misc" / "00000001_000.png", SHARED / "misc" / "00027426_000.png"]
# DCM codes: Probability, Threshold Value, Presence of property, Finding, Tracking
# Identifier, Imaging Measurements, Measurement Group, Image Library, Source of Measurement
PROBABILITY, THRESHOLD, PRESENCE, FINDING = "122157", "122411", "121052", "121071"
TRACKING_IDENTIFIER, IMAGING_MEASUREMENTS, MEASUREMENT_GROUP = "112039", "126010", "125007"
IMAGE_LIBRARY, SOURCE_OF_MEASUREMENT = "111028", "121112"
PRESENT = "52101004"  # SNOMED CT: Present
PRIVATE_SCHEME = "99CXR"
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


def _concept(item: pydicom.Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def finding_groups(report: pydicom.Dataset) -> list[pydicom.Dataset]:
    """TID 1500's measurement groups: Imaging Measurements > Measurement Group."""
    (measurements,) = [i for i in report.ContentSequence if _concept(i) == IMAGING_MEASUREMENTS]
    groups = list(measurements.ContentSequence)
    assert all(_concept(g) == MEASUREMENT_GROUP for g in groups)
    return groups


def report_findings(report: pydicom.Dataset) -> dict[str, dict]:
    """label -> {probability, threshold, positive}, walking the SR by its codes. A label is
    its private code's value (percent-decoded) or, for a standard code, the group's
    Tracking Identifier."""
    findings = {}
    for group in finding_groups(report):
        values, label = {}, None
        for child in group.ContentSequence:
            concept = _concept(child)
            if child.ValueType == "NUM":
                key = {PROBABILITY: "probability", THRESHOLD: "threshold"}[concept]
                values[key] = float(child.MeasuredValueSequence[0].FloatingPointValue)
            elif concept == PRESENCE:
                values["positive"] = child.ConceptCodeSequence[0].CodeValue == PRESENT
            elif concept == TRACKING_IDENTIFIER:
                label = label or str(child.TextValue)
            elif concept == FINDING:
                code = child.ConceptCodeSequence[0]
                if code.CodingSchemeDesignator == PRIVATE_SCHEME:
                    label = urllib.parse.unquote(code.get("CodeValue") or code.LongCodeValue)
        findings[label] = values
    return findings


def referenced_image(report: pydicom.Dataset) -> tuple[str, str]:
    """(SOP class, SOP instance) of the image library's one image, which every finding's
    Source of Measurement names too."""
    (library,) = [i for i in report.ContentSequence if _concept(i) == IMAGE_LIBRARY]
    (group,) = library.ContentSequence
    (image,) = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    found = {_sop_reference(image)}
    for finding in finding_groups(report):
        (source,) = [i for i in finding.ContentSequence if _concept(i) == SOURCE_OF_MEASUREMENT]
        found.add(_sop_reference(source))
    (reference,) = found
    return reference


def _sop_reference(item: pydicom.Dataset) -> tuple[str, str]:
    reference = item.ReferencedSOPSequence[0]
    return str(reference.ReferencedSOPClassUID), str(reference.ReferencedSOPInstanceUID)


def text_items(report: pydicom.Dataset) -> dict[str, str]:
    """Concept meaning -> text of the first finding's TEXT items (the algorithm's
    identification, TID 4019, and the tracking identifier)."""
    first = finding_groups(report)[0]
    items = {}
    for item in first.ContentSequence:
        for child in [item, *item.get("ContentSequence", [])]:
            if child.ValueType == "TEXT":
                items[str(child.ConceptNameCodeSequence[0].CodeMeaning)] = str(child.TextValue)
    return items


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
