"""The 14 ChestX-ray14 pathologies in NIH's order, and label-string parsing."""

from __future__ import annotations

from collections.abc import Sequence

from cxr.errors import DataError

PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
NUM_CLASSES = len(PATHOLOGIES)

# NIH's bounding-box file spells one class differently from the label table.
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}


def parse_finding_labels(text: str, *, where: str = "") -> list[int]:
    """Turn NIH's ``A|B|C`` (or ``No Finding``) into 14 0/1 flags in NIH order."""
    flags = [0] * NUM_CLASSES
    text = (text or "").strip()
    if not text:
        raise DataError(f"{where}empty 'Finding Labels'")
    for name in text.split("|"):
        name = name.strip()
        if name == NO_FINDING:
            continue
        try:
            flags[PATHOLOGIES.index(name)] = 1
        except ValueError:
            raise DataError(
                f"{where}unknown label {name!r} in 'Finding Labels' {text!r}; "
                f"expected one of {', '.join(PATHOLOGIES)} or {NO_FINDING!r}"
            ) from None
    return flags


def format_finding_labels(flags) -> str:
    names = [name for name, flag in zip(PATHOLOGIES, flags) if flag]
    return "|".join(names) if names else NO_FINDING


def canonical_pathology(name: str) -> str:
    """Accept a pathology name in any case, or a box-file alias, and return NIH's spelling."""
    name = BOX_LABEL_ALIASES.get(name, name)
    for known in PATHOLOGIES:
        if known.lower() == name.lower().replace(" ", "_"):
            return known
    raise ValueError(f"unknown pathology {name!r}; expected one of {', '.join(PATHOLOGIES)}")


# ---------------------------------------------------------------------------------------------
# Vocabularies of the other public datasets, and the maps between them

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# MIMIC-CXR-JPG's labels come from the same CheXpert labeller, under the same names, and
# cxr keeps them in CheXpert's order: the label order is the order of a model's outputs, so a
# MIMIC model and a CheXpert model answer in the same order, and one fine-tunes into the other
# row for row. (MIMIC's mimic-cxr-2.0.0-chexpert.csv has its columns in alphabetical order;
# the reader reads them by name, so the file's order does not matter.)
MIMIC_LABELS = CHEXPERT_LABELS

# How an NIH model's outputs answer another vocabulary's labels: each target label is scored
# by the highest probability among the listed NIH outputs (a call is positive when any of
# them is). Same-named labels map to themselves. Pairs are ours where the vocabularies do
# not line up one to one; each is a judgement, stated here so that a user can override it
# (``--label-map``):
#  - CheXpert's "Lung Lesion" is a mass or a nodule;
#  - NIH's "Pleural_Thickening" is only part of CheXpert's broader "Pleural Other", and
#    "Lung Opacity" is broader than any NIH label, so neither is mapped.
NIH_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema",),
    "Pleural Effusion": ("Effusion",),
    "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
    "Lung Lesion": ("Mass", "Nodule"),
}
# The radiologist-adjudicated labels of Majkowska et al. (Radiology 2019) for 4,376 NIH
# images. "Airspace opacity" there covers consolidation, infiltrates, pneumonia, atelectasis
# and edema-like opacities, so it takes the highest of those NIH outputs; "Fracture" has no
# NIH output and is left out (and said so).
GOOGLE2019_LABELS: tuple[str, ...] = (
    "Fracture",
    "Pneumothorax",
    "Airspace opacity",
    "Nodule or mass",
)
NIH_TO_GOOGLE2019: dict[str, tuple[str, ...]] = {
    "Pneumothorax": ("Pneumothorax",),
    "Nodule or mass": ("Nodule", "Mass"),
    "Airspace opacity": ("Atelectasis", "Consolidation", "Infiltration", "Pneumonia", "Edema"),
}


def default_label_map(
    model_labels: Sequence[str], data_labels: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """Which model outputs score each data label: same names first, then the NIH map in
    whichever direction applies. Data labels no model output answers are left out."""
    model_set = set(model_labels)
    mapping: dict[str, tuple[str, ...]] = {}
    for target in data_labels:
        if target in model_set:
            mapping[target] = (target,)
            continue
        for table in (NIH_TO_CHEXPERT, NIH_TO_GOOGLE2019):
            sources = table.get(target)
            if sources and all(s in model_set for s in sources):
                mapping[target] = sources
                break
        else:
            # The other direction: a CheXpert-trained model scored on NIH's labels.
            reverse = [k for k, v in NIH_TO_CHEXPERT.items() if v == (target,) and k in model_set]
            if reverse:
                mapping[target] = (reverse[0],)
    return mapping


def parse_label_map(text: str) -> dict[str, tuple[str, ...]]:
    """``--label-map 'Pleural Effusion=Effusion;Lung Lesion=Mass|Nodule'``: data label =
    model output(s), entries separated by ``;``, several outputs by ``|``."""
    mapping: dict[str, tuple[str, ...]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        target, sep, sources = entry.partition("=")
        names = tuple(s.strip() for s in sources.split("|") if s.strip())
        if not sep or not target.strip() or not names:
            raise DataError(
                f"label map entry {entry!r}: expected DATA_LABEL=MODEL_LABEL[|MODEL_LABEL...]"
            )
        mapping[target.strip()] = names
    return mapping


MAX_LABEL_CHARS = 256


def label_name_problem(label: str) -> str | None:
    """Why ``label`` cannot be a label name, or None. A label travels as a CSV header, a JSON
    key, Markdown, HTML, a figure title and a DICOM code meaning, so it must be printable
    text on one line (any language, any punctuation) of at most 256 characters."""
    if not label.strip():
        return "it is blank"
    if len(label) > MAX_LABEL_CHARS:
        return f"it has {len(label):,} characters (at most {MAX_LABEL_CHARS})"
    bad = next((ch for ch in label if not ch.isprintable()), None)
    if bad is not None:
        return f"it holds the control character {bad!r}"
    return None
