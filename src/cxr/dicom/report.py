"""The DICOM objects the listener answers with: a Comprehensive SR (highdicom) stating, for
each of the bundle's findings, the probability, the threshold and the call, with the model's
name, version and weights digest, referencing the source image; and optionally a Secondary
Capture of a Grad-CAM overlay per positive finding, marked as not for primary diagnosis.

Their UIDs are derived from the source's SOP Instance UID and the model's digest, so that a
report made twice (a restart after a crash) is the same instance to the destination, which
keeps one copy: this is what makes delivery exactly-once when a send is repeated.
"""

from __future__ import annotations

import copy
import datetime
import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DS, DT, TM

import cxr
from cxr.model.bundle import meta_digest

# Findings and the threshold concept have no standard code: a private coding scheme (PS3.16
# 8.2: designators beginning with 99 are local).
CODING_SCHEME = "99CXR"
MANUFACTURER = "cxr"
# highdicom warns when it copies a one-component Patient's Name (anonymised files often
# have one); the report copies the source's name as it is.
warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"


@dataclass(frozen=True)
class ModelInfo:
    """What a report says about the model that made it."""

    name: str
    version: str
    digest: str  # SHA-256 of the weights (or of the ONNX file)
    labels: tuple[str, ...]
    thresholds: tuple[float, ...]
    meta_digest: str = ""  # SHA-256 of model.json: new thresholds make new reports

    @property
    def key(self) -> str:
        """What a report's UIDs derive from: the weights and the description."""
        return f"{self.digest}/{self.meta_digest}"


def derived_uid(*parts: str) -> str:
    """A UID that is always the same for the same parts (pydicom hashes them)."""
    return generate_uid(entropy_srcs=[*parts, "cxr"])


def highdicom_report(source: pydicom.Dataset, model: ModelInfo, probabilities) -> Dataset:
    """The Comprehensive SR for one image, built by highdicom (about 0.1 s: it validates
    and deep-copies the content tree). :class:`ReportMaker` gives the same object faster."""
    source_uid = str(source.SOPInstanceUID)
    content = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id=None)
    content.ContentSequence = [
        *_algorithm_items(model),
        hd.sr.ImageContentItem(
            name=codes.DCM.SourceImage,
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=source_uid,
            relationship_type="CONTAINS",
        ),
        *[
            _finding(label, float(p), float(t))
            for label, p, t in zip(model.labels, probabilities, model.thresholds)
        ],
    ]
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=content,
        series_instance_uid=derived_uid(str(source.StudyInstanceUID), model.key, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source_uid, model.key, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"cxr findings ({model.name})",
    )


class ReportMaker:
    """Structured reports for one model at the cost of writing them: highdicom builds one
    report (on a placeholder image) once, and each image's report is that one with the
    values that differ replaced: the source's patient, study and instance references, the
    derived UIDs, the times, and each finding's probability and call. The tests hold it
    equal, element by element, to :func:`highdicom_report` for the same image."""

    def __init__(self, model: ModelInfo):
        self.model = model
        self._lock = threading.Lock()  # the template is filled in place
        self._report = highdicom_report(_placeholder(), model, [0.0] * len(model.labels))
        self._image = self._report.ContentSequence[len(_algorithm_items(model))]
        self._findings = self._report.ContentSequence[len(_algorithm_items(model)) + 1 :]
        self._own = {element.tag for element in self._report}

    def report(self, source: pydicom.Dataset, probabilities: Sequence[float]) -> bytes:
        """The report for ``source`` (its header is enough), as a DICOM file's bytes."""
        with self._lock:
            self._fill(source, probabilities)
            return _file_bytes(self._report)

    def _fill(self, source: pydicom.Dataset, probabilities: Sequence[float]) -> None:
        report, model = self._report, self.model
        source_uid, study_uid = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
        report.SOPInstanceUID = derived_uid(source_uid, model.key, "sr")
        report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
        report.SeriesInstanceUID = derived_uid(study_uid, model.key, "sr")
        report.StudyInstanceUID = study_uid
        for tag in [element.tag for element in report if element.tag not in self._own]:
            del report[tag]  # what the previous image's modules brought
        for keyword in _COPIED:
            setattr(report, keyword, source.get(keyword, ""))
        # The Patient, General Study, Patient Study and Clinical Trial modules, as
        # highdicom's own SR construction copies them. highdicom adds the source's element
        # objects themselves: filled in place for the next image, they would rewrite this
        # source's patient and study (its overlays were filed under the next patient), so
        # the template takes copies.
        report.copy_patient_and_study_information(copy.deepcopy(source))
        if "SpecificCharacterSet" in source:
            report.SpecificCharacterSet = source.SpecificCharacterSet
        elif "SpecificCharacterSet" in report:
            del report.SpecificCharacterSet
        now = datetime.datetime.now()
        report.InstanceCreationDate = report.ContentDate = DA(now.date())
        report.InstanceCreationTime = report.ContentTime = TM(now.time())
        for equipment in report.get("ContributingEquipmentSequence", []):
            equipment.ContributionDateTime = DT(now)
        (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
        evidence.StudyInstanceUID = study_uid
        (series,) = evidence.ReferencedSeriesSequence
        series.SeriesInstanceUID = str(source.SeriesInstanceUID)
        for reference in (series.ReferencedSOPSequence[0], self._image.ReferencedSOPSequence[0]):
            reference.ReferencedSOPClassUID = str(source.SOPClassUID)
            reference.ReferencedSOPInstanceUID = source_uid
        for finding, p, threshold in zip(self._findings, probabilities, model.thresholds):
            _, probability, _, presence = finding.ContentSequence
            measured = probability.MeasuredValueSequence[0]
            measured.NumericValue = DS(float(p), auto_format=True)
            measured.FloatingPointValue = float(p)
            present = codes.SCT.Present if float(p) >= threshold else codes.SCT.Absent
            presence.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(present)]


# What highdicom copies from the first evidence into an SR (besides the study UID).
_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _placeholder() -> Dataset:
    """An image header with every attribute a report copies, for the template."""
    image = Dataset()
    image.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    image.SOPInstanceUID = image.StudyInstanceUID = image.SeriesInstanceUID = "1.2.3"
    for keyword in _COPIED:
        setattr(image, keyword, "")
    return image


def _algorithm_items(model: ModelInfo) -> list:
    # TID 4019 (Algorithm Identification)'s concepts.
    return [
        hd.sr.TextContentItem(codes.DCM.AlgorithmName, model.name, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(
            codes.DCM.AlgorithmVersion, model.version, relationship_type="CONTAINS"
        ),
        hd.sr.TextContentItem(
            codes.DCM.AlgorithmParameters,
            f"weights sha256:{model.digest}",
            relationship_type="CONTAINS",
        ),
    ]


def _finding(label: str, probability: float, threshold: float):
    finding = hd.sr.ContainerContentItem(name=codes.DCM.Finding, relationship_type="CONTAINS")
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    finding.ContentSequence = [
        hd.sr.CodeContentItem(codes.DCM.Finding, finding_code(label), relationship_type="CONTAINS"),
        hd.sr.NumContentItem(
            codes.DCM.Probability, probability, unit, relationship_type="CONTAINS"
        ),
        hd.sr.NumContentItem(
            codes.DCM.ThresholdValue, threshold, unit, relationship_type="CONTAINS"
        ),
        hd.sr.CodeContentItem(
            codes.DCM.PresenceOfProperty,
            codes.SCT.Present if probability >= threshold else codes.SCT.Absent,
            relationship_type="CONTAINS",
        ),
    ]
    return finding


def finding_code(label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(label, CODING_SCHEME, label.replace("_", " "))


def read_findings(report: pydicom.Dataset) -> dict[str, dict[str, object]]:
    """label -> probability, threshold and call, read back from a report this module made
    (by concept codes, for the tests and for anyone checking a report)."""
    findings = {}
    for item in report.ContentSequence:
        if item.ValueType != "CONTAINER":
            continue
        values: dict[str, object] = {}
        for child in item.ContentSequence:
            concept = child.ConceptNameCodeSequence[0].CodeValue
            if child.ValueType == "NUM":
                measured = child.MeasuredValueSequence[0]
                number = float(measured.get("FloatingPointValue", measured.NumericValue))
                values["probability" if concept == codes.DCM.Probability.value else "threshold"] = (
                    number
                )
            elif concept == codes.DCM.Finding.value:
                code = child.ConceptCodeSequence[0]
                values["label"] = code.get("CodeValue") or code.LongCodeValue
            else:
                values["positive"] = child.ConceptCodeSequence[0].CodeValue == (
                    codes.SCT.Present.value
                )
        findings[str(values.pop("label"))] = values
    return findings


def overlay_capture(
    source: pydicom.Dataset, model: ModelInfo, label: str, overlay_rgb: np.ndarray, number: int
) -> bytes:
    """A Secondary Capture of one finding's Grad-CAM overlay (``[H, W, 3]`` uint8), with
    the warning burnt into the title and stated in Image Comments and the series."""
    source_uid = str(source.SOPInstanceUID)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(overlay_rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(str(source.StudyInstanceUID), model.key, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source_uid, model.key, "sc", label),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )
    image.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    image.BurnedInAnnotation = "YES"
    image.SeriesDescription = f"cxr Grad-CAM, {NOT_FOR_DIAGNOSIS}"
    image.ImageComments = (
        f"{NOT_FOR_DIAGNOSIS}. Grad-CAM heatmap of {label} from {model.name} "
        f"(weights sha256:{model.digest[:16]}...): where the model's evidence lies, not a "
        "segmentation."
    )
    image.DerivationDescription = f"Grad-CAM of {label} over the model's input crop"
    return _file_bytes(image)


def model_info(meta, digest: str) -> ModelInfo:
    """From a bundle's description (:class:`cxr.model.bundle.BundleMeta`) and its digest."""
    return ModelInfo(
        name=f"cxr {meta.architecture} ({len(meta.labels)} findings)",
        version=f"cxr {cxr.__version__}, {meta.format}",
        digest=digest,
        labels=tuple(meta.labels),
        thresholds=tuple(float(t) for t in meta.decision_thresholds),
        meta_digest=meta_digest(meta),
    )


def _file_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
