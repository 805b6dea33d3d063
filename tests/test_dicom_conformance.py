"""The node's output objects against dicom3tools' ``dciodvfy`` (the real binary) and a
reading of the TID 1500 structure by its codes: the SR adds no error, the overlays none
that their source does not already have, and no coding scheme goes undeclared."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_support import (
    PRIVATE_SCHEME,
    finding_groups,
    good_inputs,
    referenced_image,
    report_findings,
)

from cxr.dicom.report import (
    ModelInfo,
    ReportMaker,
    overlay_capture,
    overlay_pixels,
    read_findings,
)
from cxr.labels import PATHOLOGIES

TEMPLATE_1500 = "1500"
DEVICE, OBSERVER_TYPE = "121007", "121005"  # DCM: Device, Observer Type
HOSTILE = (
    "x" * 70,
    "é" * 40 + "x" * 30,
    "back\\slash|=cmd",
    "Épanchement pleural",
    "Épanché",  # under 16 characters, over 16 bytes: a code value, not a long one
    "  spaced  ",
    "<b>%41</b>",
)


def dciodvfy(data: bytes, folder: Path, name: str) -> list[str]:
    """dciodvfy's Error and Warning lines for one file."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed")
    path = folder / f"{name}.dcm"
    path.write_bytes(data)
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def undeclared_scheme_warnings(lines: list[str], dataset: pydicom.Dataset) -> list[str]:
    """Warnings naming a coding scheme the object does not declare. (dciodvfy warns about
    any designator not in its own list, declared or not: a declared one is accepted here.)"""
    declared = {
        str(item.CodingSchemeDesignator)
        for item in dataset.get("CodingSchemeIdentificationSequence", [])
    }
    found = []
    for line in lines:
        match = re.search(r"<([^>]*)> for value 1 of attribute <Coding Scheme Designator>", line)
        undeclared = match is not None and match.group(1) not in declared
        if undeclared or (match is None and "coding scheme" in line.lower()):
            found.append(line)
    return found


def errors_of(lines: list[str]) -> set[str]:
    return {line for line in lines if line.startswith("Error")}


@pytest.fixture(scope="module")
def model() -> ModelInfo:
    labels = PATHOLOGIES + HOSTILE
    return ModelInfo("cxr test", "1.0", "ab" * 32, labels, tuple([0.5] * len(labels)), "cd")


@pytest.fixture(scope="module")
def sources() -> dict[str, pydicom.Dataset]:
    return {name: pydicom.dcmread(io.BytesIO(data)) for name, data in good_inputs().items()}


@pytest.mark.slow
def test_the_sr_adds_no_error_and_declares_its_private_codes(model, sources, tmp_path):
    maker = ReportMaker(model)
    probabilities = np.linspace(0.0, 1.0, len(model.labels))
    for name, source in sources.items():
        data = maker.report(source, probabilities)
        report = pydicom.dcmread(io.BytesIO(data))
        lines = dciodvfy(data, tmp_path, f"sr-{name}")
        assert not errors_of(lines), (name, lines)
        assert not undeclared_scheme_warnings(lines, report), (name, lines)
        assert referenced_image(report) == (str(source.SOPClassUID), str(source.SOPInstanceUID))
        findings = report_findings(report)
        assert list(findings) == list(model.labels)  # every label exactly, in order
        assert read_findings(report) == findings  # cxr's own reader agrees
        for label, p, threshold in zip(model.labels, probabilities, model.thresholds):
            assert findings[label] == {
                "probability": pytest.approx(p),
                "threshold": threshold,
                "positive": bool(p >= threshold),
            }


def test_the_sr_is_a_tid_1500_measurement_report_by_a_device(model, sources, tmp_path):
    source = sources["real-cr"]
    data = ReportMaker(model).report(source, np.full(len(model.labels), 0.7))
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    dump = subprocess.run(["dcmdump", "+L", str(path)], capture_output=True, text=True).stdout
    assert "TemplateIdentifier" in dump and f"[{TEMPLATE_1500}]" in dump
    report = pydicom.dcmread(path)
    (template,) = report.ContentTemplateSequence
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", TEMPLATE_1500)
    assert report.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    observer = [
        item
        for item in report.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == OBSERVER_TYPE
    ]
    assert [o.ConceptCodeSequence[0].CodeValue for o in observer] == [DEVICE]
    assert len(finding_groups(report)) == len(model.labels)
    (scheme,) = report.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME and scheme.CodingSchemeName
    assert report.SpecificCharacterSet == "ISO_IR 192"
    assert "Épanchement pleural" in report_findings(report)


def test_overlays_add_no_error_their_source_lacks(model, sources, tmp_path):
    rng = np.random.default_rng(0)
    for name, source in sources.items():
        source_errors = errors_of(dciodvfy(source_bytes(source), tmp_path, f"src-{name}"))
        crop = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        numbers = set()
        for label in (model.labels[0], model.labels[-1]):
            rgb = overlay_pixels(crop, rng.random((64, 64)), [label, "p=0.9", "NOT FOR"])
            data = overlay_capture(source, model, label, rgb)
            capture = pydicom.dcmread(io.BytesIO(data))
            lines = dciodvfy(data, tmp_path, f"sc-{name}")
            assert errors_of(lines) <= source_errors, (name, errors_of(lines) - source_errors)
            assert not undeclared_scheme_warnings(lines, capture), (name, lines)
            for sequence in (capture.SourceImageSequence, capture.ReferencedImageSequence):
                (reference,) = sequence
                assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
                assert reference.ReferencedSOPClassUID == source.SOPClassUID
            assert (capture.PatientID, capture.StudyInstanceUID) == (
                source.PatientID,
                source.StudyInstanceUID,
            )
            numbers.add((capture.SeriesInstanceUID, capture.InstanceNumber))
        assert len(numbers) == 2  # one series per source, numbers unique in it


def source_bytes(source: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("labels", [("Mass", "Mass"), ("Mass", "   "), ("bad\udc80",)])
def test_labels_a_report_cannot_carry_are_refused_when_the_node_is_made(labels):
    from cxr.errors import CxrError

    with pytest.raises(CxrError, match="label"):
        ReportMaker(ModelInfo("m", "1", "ab" * 32, labels, (0.5,) * len(labels)))
