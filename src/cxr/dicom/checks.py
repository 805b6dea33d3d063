"""What the listener accepts: a chest radiograph it can read, checked from the received bytes
before anything is spooled or acknowledged. Each refusal is a :class:`Refused` whose message
is the reason stored with the instance and sent back to the sender."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cxr.data.images import MAX_PIXELS, read_dicom
from cxr.errors import CxrError, ImageError

MODALITIES = ("CR", "DX")
# Raw detector data, before the modality's processing: not what the model was trained on.
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"  # Digital X-Ray Image Storage - For Processing
FOR_PROCESSING_REASON = "FOR PROCESSING image: only FOR PRESENTATION radiographs are read"
FRONTAL_VIEWS = ("PA", "AP")
# View Code Sequence (SNOMED CT, CID 4010) for DX images that carry no View Position.
_VIEW_CODES = {
    "399348003": "PA",  # postero-anterior
    "399012007": "AP",  # antero-posterior
    "399067008": "LL",  # lateral
    "399198007": "RL",  # right lateral
    "399173006": "LL",  # left lateral
}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


class Refused(CxrError):
    """An instance the listener will not read; the message is the reason."""


@dataclass(frozen=True)
class Instance:
    """The identifiers of an accepted instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None


def valid_uid(value: object) -> bool:
    """A DICOM UID (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters.
    The spool names files after it, so nothing else may pass."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def identify(dataset) -> Instance:
    """The instance's identifiers, or :class:`Refused` when one is missing or malformed."""
    values = {}
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(dataset.get(keyword, "") or "")
        if not valid_uid(value):
            shown = repr(value[:70]) if value else "missing"
            raise Refused(f"{keyword} is {shown}, not a valid UID")
        values[keyword] = value
    patient = dataset.get("PatientID")
    return Instance(
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        patient_id=str(patient) if patient else None,
    )


def check_instance(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Instance:
    """Check a received instance (a DICOM file's bytes): its identifiers, a CR or DX
    modality, for presentation (not FOR PROCESSING), a frontal view, and pixels the decoder
    can read (grayscale, 8-16 bits, sizes declared within ``max_pixels`` and matching the
    data, a supported transfer syntax). Returns its identifiers or raises :class:`Refused`
    with the reason."""
    try:
        dataset = read_dicom(data, name="instance", max_pixels=max_pixels)
    except ImageError as exc:
        raise Refused(str(exc).removeprefix("instance: ")) from None
    instance = identify(dataset)
    modality = str(dataset.get("Modality", "") or "").upper()
    if modality not in MODALITIES:
        raise Refused(
            f"modality {modality or 'missing'!s:.16} is not a radiograph "
            f"({' or '.join(MODALITIES)} expected)"
        )
    _check_presentation_intent(dataset, instance.sop_class_uid)
    view = frontal_view(dataset)
    if view not in FRONTAL_VIEWS:
        raise Refused(
            f"view {view!s:.16} is not frontal (PA or AP expected)"
            if view
            else "view position unknown (no View Position or View Code Sequence): only "
            "frontal PA or AP views are read"
        )
    _check_pixels(dataset)
    return instance


def frontal_view(dataset) -> str | None:
    """The view as View Position (PA, AP, LL...) or, failing that, from the View Code
    Sequence; None when the file says neither."""
    position = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if position:
        return position
    for item in dataset.get("ViewCodeSequence", []) or []:
        code = str(item.get("CodeValue", "") or "")
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        if code:
            return f"code {code}"
    return None


def _check_presentation_intent(dataset, sop_class_uid: str) -> None:
    intent = str(dataset.get("PresentationIntentType", "") or "").strip().upper()
    if sop_class_uid == DX_FOR_PROCESSING or intent == "FOR PROCESSING":
        raise Refused(FOR_PROCESSING_REASON)


def _check_pixels(dataset) -> None:
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").upper()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in PHOTOMETRICS:
        raise Refused(
            f"photometric interpretation {photometric or 'missing'!s:.16} with {samples} "
            "samples per pixel is not a grayscale radiograph (MONOCHROME1 or 2 expected)"
        )
    bits = int(dataset.get("BitsStored", 0) or 0)
    if not 8 <= bits <= 16:
        raise Refused(f"{bits} bits stored per pixel (8 to 16 expected)")
