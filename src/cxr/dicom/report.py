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
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DS, DT, TM, validate_value

import cxr
from cxr.errors import CxrError
from cxr.explain.render import heatmap_rgb
from cxr.utils import printable_text

# Findings without a standard code: a private coding scheme (PS3.16 8.2: designators
# beginning with 99 are local), declared in each report that uses it.
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


# Findings with a standard code (verified against pydicom's code dictionary); the others
# are coded in the private scheme below, declared in each report. NIH's names and the
# CheXpert/MIMIC names that differ from them.
STANDARD_CODES: dict[str, Code] = {
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Effusion": codes.SCT.PleuralEffusion,
    "Pleural Effusion": codes.SCT.PleuralEffusion,
    "Infiltration": codes.DCM.Infiltrate,
    "Mass": codes.SCT.Mass,
    "Nodule": codes.SCT.Nodule,
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Edema": codes.SCT.PulmonaryEdema,  # NIH's and CheXpert's edema is pulmonary
    "Fibrosis": codes.SCT.Fibrosis,
    "Lung Opacity": codes.DCM.Opacity,
}
CODING_SCHEME_NAME = "cxr findings"
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) not in "%\\")  # UC has no "\\"


def check_labels(labels: Sequence[str]) -> None:
    """Refuse, before anything listens, labels a report could not carry exactly."""
    if len(set(labels)) != len(labels):
        raise CxrError("the model's labels repeat: a report could not tell its findings apart")
    for label in labels:
        if not label.strip():
            raise CxrError(f"label {label!r}: an empty label cannot be coded in a report")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise CxrError(f"label {label!r} is not valid Unicode text") from None


def finding_code(label: str) -> hd.sr.CodedConcept:
    """The label's standard code, or a private one whose value is the label itself
    (percent-encoded where DICOM text cannot hold a character), so that it survives exactly."""
    standard = STANDARD_CODES.get(label)
    if standard is not None:  # the label itself is the group's tracking identifier
        return hd.sr.CodedConcept.from_code(standard)
    # ASCII only (a code value's length limit counts bytes in some readers): non-ASCII,
    # control characters, "%" and the backslash are percent-encoded (UTF-8).
    value = urllib.parse.quote(label, safe=_SAFE)
    if value.endswith(" "):  # trailing spaces are padding in DICOM text
        value = value.rstrip(" ") + "%20" * (len(value) - len(value.rstrip(" ")))
    if value.startswith(" "):
        value = "%20" + value[1:]
    meaning = _long_string(" ".join(label.replace("_", " ").replace("\\", "/").split()))
    meaning = meaning or "finding"
    return hd.sr.CodedConcept(value, CODING_SCHEME, meaning)


def _long_string(text: str) -> str:
    """``text`` cut to what an LO holds: 64 bytes in UTF-8 (dciodvfy counts bytes, so a
    64-character meaning with an accent would be an error), never inside a character."""
    return text.encode("utf-8")[:64].decode("utf-8", "ignore")


def private_label(code: Dataset) -> str | None:
    """The label a private finding code stands for (the inverse of :func:`finding_code`),
    or None for a standard code (whose group's tracking identifier names the label)."""
    if code.CodingSchemeDesignator != CODING_SCHEME:
        return None
    return urllib.parse.unquote(str(code.get("CodeValue") or code.get("LongCodeValue")))


def coding_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = CODING_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "cxr project"
    return item


def highdicom_report(source: pydicom.Dataset, model: ModelInfo, probabilities) -> Dataset:
    """The TID 1500 Measurement Report for one image, built by highdicom (over 0.1 s: it
    validates and deep-copies the content tree). :class:`ReportMaker` gives the same
    object faster."""
    source_uid = str(source.SOPInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=[f"weights sha256:{model.digest}"]
    )
    groups = [
        _finding_group(source, model, algorithm, index, float(p))
        for index, p in enumerate(probabilities)
    ]
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=[_library_view(source)],
    )
    report = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=content[0],
        series_instance_uid=derived_uid(str(source.StudyInstanceUID), model.key, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source_uid, model.key, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"cxr findings ({model.name})",
    )
    report.SpecificCharacterSet = "ISO_IR 192"  # labels and copied names as UTF-8
    _blank_invalid(report)
    if any(c.CodingSchemeDesignator == CODING_SCHEME for c in _codes_of(model)):
        report.CodingSchemeIdentificationSequence = [coding_scheme()]
    return report


def _blank_invalid(report: Dataset) -> None:
    """Values copied from a source that breaks its VR (a Patient's Age of "62") would be the
    report's own errors: they are left empty (every copied attribute is Type 2 or 3)."""
    for element in report:
        if element.VR in ("SQ", "OB", "OW", "UN") or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            if not isinstance(value, str):  # numbers and UIDs set by highdicom or here
                continue
            try:
                validate_value(element.VR, value, config.RAISE)
            except (ValueError, TypeError):
                element.value = None
                break


def _codes_of(model: ModelInfo) -> list[hd.sr.CodedConcept]:
    return [finding_code(label) for label in model.labels]


def _observation_context(model: ModelInfo) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(model.key, "device"),
        name=_long_string(model.name),
        manufacturer_name=MANUFACTURER,
        model_name=_long_string(model.version),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _library_view(source: pydicom.Dataset) -> Dataset:
    """What the image library describes of the source: highdicom's projection descriptors
    need Patient Orientation and Imager Pixel Spacing, which many radiographs lack; without
    them the entry keeps modality and size only."""
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in source:
            setattr(view, keyword, source[keyword].value)
    projection = all(source.get(k) for k in ("PatientOrientation", "ImagerPixelSpacing"))
    view.Modality = source.get("Modality", "OT") if projection else "OT"
    if projection:
        view.PatientOrientation = list(source.PatientOrientation)
        view.ImagerPixelSpacing = list(source.ImagerPixelSpacing)
    return view


def _finding_group(source, model: ModelInfo, algorithm, index: int, probability: float):
    """TID 1501: one finding, its probability, the threshold and the call."""
    label, threshold = model.labels[index], model.thresholds[index]
    source_uid = str(source.SOPInstanceUID)
    present = codes.SCT.Present if probability >= threshold else codes.SCT.Absent
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(source_uid, model.key, "finding", str(index)),
            identifier=label,  # UT: any length, backslashes, the report's character set
        ),
        finding_type=finding_code(label),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(codes.DCM.Probability, probability, UNITLESS),
            hd.sr.Measurement(codes.DCM.ThresholdValue, float(threshold), UNITLESS),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.DCM.PresenceOfProperty, present)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), source_uid)],
    )


class ReportMaker:
    """Reports for one model at the cost of writing them: highdicom builds one report (on
    a placeholder image) once, and each image's report is that one with what differs
    replaced: the patient, study and instance references, the derived UIDs, the times, the
    image library entry, and each finding's tracking UID, probability and call. The tests
    hold it equal, element by element, to :func:`highdicom_report` for the same image.
    Nothing of a source is kept in the template (values are copied, never elements)."""

    def __init__(self, model: ModelInfo):
        check_labels(model.labels)
        self.model = model
        self._lock = threading.Lock()  # the template is filled in place
        self._report = highdicom_report(_placeholder(), model, [0.0] * len(model.labels))
        self._own = {element.tag for element in self._report}
        root = self._report.ContentSequence
        self._library = _index_of(root, codes.DCM.ImageLibrary)
        measurements = root[_index_of(root, codes.DCM.ImagingMeasurements)]
        self._groups = [_GroupSlots(group) for group in measurements.ContentSequence]
        # Writing is most of a report's cost (hundreds of nested items): the parts that are
        # the same for every image are encoded once and written as they are.
        slots = {id(d) for g in self._groups for d in g.datasets()}
        for n, item in enumerate(root):
            if n != self._library:
                _freeze(item, slots)
        self._report.SpecificCharacterSet = "ISO_IR 192"
        _mark_encoded(self._report)

    def report(self, source: pydicom.Dataset, probabilities: Sequence[float]) -> bytes:
        """The report for ``source`` (its header is enough), as a DICOM file's bytes."""
        library = hd.sr.ImageLibrary([_library_view(source)])[0]
        with self._lock:
            self._fill(source, probabilities, library)
            return _file_bytes(self._report)

    def _fill(self, source: pydicom.Dataset, probabilities, library: Dataset) -> None:
        report, model = self._report, self.model
        source_uid, study_uid = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
        report.SOPInstanceUID = derived_uid(source_uid, model.key, "sr")
        report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
        report.SeriesInstanceUID = derived_uid(study_uid, model.key, "sr")
        report.StudyInstanceUID = study_uid
        for tag in [element.tag for element in report if element.tag not in self._own]:
            del report[tag]  # what the previous image's modules brought
        for keyword in _COPIED:
            setattr(report, keyword, copy.deepcopy(source.get(keyword, "")))
        # The Patient, General Study, Patient Study and Clinical Trial modules, as
        # highdicom's own SR construction copies them. highdicom adds the source's element
        # objects themselves: filled in place for the next image, they would rewrite this
        # source's patient and study (its overlays were filed under the next patient), so
        # the template takes copies.
        report.copy_patient_and_study_information(copy.deepcopy(source))
        report.SpecificCharacterSet = "ISO_IR 192"
        _blank_invalid(report)
        now = datetime.datetime.now()
        report.InstanceCreationDate = report.ContentDate = DA(now.date())
        report.InstanceCreationTime = report.ContentTime = TM(now.time())
        for equipment in report.get("ContributingEquipmentSequence", []):
            equipment.ContributionDateTime = DT(now)
        (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
        evidence.StudyInstanceUID = study_uid
        (series,) = evidence.ReferencedSeriesSequence
        series.SeriesInstanceUID = str(source.SeriesInstanceUID)
        _refer(series.ReferencedSOPSequence[0], source)
        # (a slice: highdicom's sequence takes a lone item, a Dataset, for an iterable)
        report.ContentSequence[self._library : self._library + 1] = [library]
        for index, (slots, p) in enumerate(zip(self._groups, probabilities)):
            slots.fill(
                source,
                derived_uid(source_uid, model.key, "finding", str(index)),
                float(p),
                model.thresholds[index],
            )


class _GroupSlots:
    """The items of one TID 1501 group that change from image to image."""

    def __init__(self, group: Dataset):
        items = {_concept(i): i for i in group.ContentSequence}
        self.tracking_uid = items[codes.DCM.TrackingUniqueIdentifier.value]
        self.probability = items[codes.DCM.Probability.value].MeasuredValueSequence[0]
        self.presence = items[codes.DCM.PresenceOfProperty.value]
        self.image = items[_SOURCE_CODE].ReferencedSOPSequence[0]

    def datasets(self) -> list[Dataset]:
        return [self.tracking_uid, self.probability, self.presence, self.image]

    def fill(self, source, tracking_uid: str, probability: float, threshold: float) -> None:
        self.tracking_uid.UID = tracking_uid
        self.probability.NumericValue = DS(probability, auto_format=True)
        self.probability.FloatingPointValue = probability
        present = codes.SCT.Present if probability >= threshold else codes.SCT.Absent
        self.presence.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(present)]
        _refer(self.image, source)


_SOURCE_CODE = codes.DCM.SourceOfMeasurement.value  # the image a group was measured on


def _freeze(dataset: Dataset, slots: set[int]) -> bool:
    """Replace each sequence under ``dataset`` that holds none of the ``slots`` (the items
    filled per image) by its encoded bytes; returns whether ``dataset`` holds a slot."""
    holds = id(dataset) in slots
    for element in list(dataset):
        if element.VR != "SQ":
            continue
        inner = [_freeze(item, slots) for item in element.value]
        if any(inner):
            holds = True
            continue
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False  # the SR's syntax
        write_sequence(buffer, element, ["utf_8"])  # ISO_IR 192, as the report declares
        value = buffer.getvalue()
        dataset[element.tag] = RawDataElement(element.tag, "SQ", len(value), value, 0, False, True)
    return holds


def _mark_encoded(dataset: Dataset) -> None:
    """Say that ``dataset`` and its items are already in the SR's encoding: else pydicom
    decodes every frozen sequence again before writing it."""
    dataset.set_original_encoding(False, True, dataset._character_set)
    for tag in dataset.keys():  # noqa: SIM118 (iterating a Dataset decodes raw elements)
        element = dataset.get_item(tag)
        if not element.is_raw and element.VR == "SQ":
            for item in element.value:
                _mark_encoded(item)


def _refer(reference: Dataset, source: pydicom.Dataset) -> None:
    reference.ReferencedSOPClassUID = str(source.SOPClassUID)
    reference.ReferencedSOPInstanceUID = str(source.SOPInstanceUID)


def _concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _index_of(items, code: Code) -> int:
    return next(n for n, item in enumerate(items) if _concept(item) == code.value)


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
    image.Rows = image.Columns = 1
    for keyword in _COPIED:
        setattr(image, keyword, "")
    return image


def read_findings(report: pydicom.Dataset) -> dict[str, dict[str, object]]:
    """label -> probability, threshold and call, read back from a report this module made
    (by concept codes, for the tests and for anyone checking a report)."""
    findings = {}
    (measurements,) = [
        item
        for item in report.ContentSequence
        if _concept(item) == codes.DCM.ImagingMeasurements.value
    ]
    for group in measurements.ContentSequence:
        values: dict[str, object] = {}
        for child in group.ContentSequence:
            concept = _concept(child)
            if child.ValueType == "NUM":
                measured = child.MeasuredValueSequence[0]
                number = float(measured.get("FloatingPointValue", measured.NumericValue))
                key = "probability" if concept == codes.DCM.Probability.value else "threshold"
                values[key] = number
            elif concept == codes.DCM.PresenceOfProperty.value:
                values["positive"] = child.ConceptCodeSequence[0].CodeValue == (
                    codes.SCT.Present.value
                )
            elif concept == _FINDING_TYPE:
                values["code"] = private_label(child.ConceptCodeSequence[0])
            elif concept == codes.DCM.TrackingIdentifier.value:
                values["identifier"] = str(child.TextValue)
        code, identifier = values.pop("code"), values.pop("identifier")
        findings[code if code is not None else identifier] = values
    return findings


_FINDING_TYPE = "121071"  # DCM "Finding": TID 1501's finding type


OVERLAY_SIZE = 512  # the overlay's square, below its text band
_BAND_LINES, _FONT_SIZE = 3, 16


def overlay_pixels(crop: np.ndarray, heatmap: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``[H, W, 3]`` uint8: a black band with ``lines`` burnt in, above the model's input
    crop blended with the colour-mapped heatmap, scaled to the bottom ``W x W`` square."""
    blended = Image.fromarray(heatmap_rgb(crop, heatmap))
    square = blended.resize((OVERLAY_SIZE, OVERLAY_SIZE), Image.Resampling.BILINEAR)
    band = _BAND_LINES * (_FONT_SIZE + 6) + 8
    canvas = Image.new("RGB", (OVERLAY_SIZE, band + OVERLAY_SIZE))
    canvas.paste(square, (0, band))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=_FONT_SIZE)
    for n, line in enumerate(list(lines)[:_BAND_LINES]):
        draw.text((6, 4 + n * (_FONT_SIZE + 6)), printable_text(line)[:60], fill="white", font=font)
    return np.asarray(canvas)


def overlay_capture(
    source: pydicom.Dataset, model: ModelInfo, label: str, overlay_rgb: np.ndarray
) -> bytes:
    """A Secondary Capture of one finding's Grad-CAM overlay (``[H, W, 3]`` uint8), with
    the warning burnt in and stated in Image Comments and the series. Each source image's
    overlays are a series of their own, numbered by the label's place in the model, so
    that numbers never repeat in a series; each names its source (Source Image Sequence,
    Referenced Image Sequence) and copies its patient, study and laterality."""
    source_uid = str(source.SOPInstanceUID)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=copy.deepcopy(source),
        pixel_array=np.ascontiguousarray(overlay_rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(source_uid, model.key, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source_uid, model.key, "sc", label),
        instance_number=model.labels.index(label) + 1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )
    image.SpecificCharacterSet = "ISO_IR 192"
    _blank_invalid(image)
    image.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    image.BurnedInAnnotation = "YES"
    image.Laterality = source.get("ImageLaterality") or source.get("Laterality") or ""
    image.SourceImageSequence = [_image_reference(source, purpose=True)]
    image.ReferencedImageSequence = [_image_reference(source, purpose=False)]
    image.SeriesDescription = f"cxr Grad-CAM, {NOT_FOR_DIAGNOSIS}"
    image.ImageComments = (
        f"{NOT_FOR_DIAGNOSIS}. Grad-CAM heatmap of {label} from {model.name} "
        f"(weights sha256:{model.digest[:16]}...): where the model's evidence lies, not a "
        "segmentation."
    )
    image.DerivationDescription = f"Grad-CAM of {label} over the model's input crop"[:1024]
    return _file_bytes(image)


def _image_reference(source: pydicom.Dataset, *, purpose: bool) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = str(source.SOPClassUID)
    reference.ReferencedSOPInstanceUID = str(source.SOPInstanceUID)
    if purpose:
        reference.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
        ]
    return reference


def model_info(meta, digest: str) -> ModelInfo:
    """From a bundle's description (:class:`cxr.model.bundle.BundleMeta`) and its digest."""
    from cxr.model.bundle import meta_digest  # (imports torch: not before the port opens)

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
