"""The 14 ChestX-ray14 pathologies in NIH's order, and label-string parsing."""

from __future__ import annotations

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
