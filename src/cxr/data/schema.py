"""The image table every dataset layout reads into, and the label sets: the one vocabulary
that the layouts (:mod:`cxr.data.layouts`) and everything that reads their tables share.

A table has one row per image with these columns (the layout's reader makes them):

- ``Image Index`` (:data:`IMAGE_COLUMN`): the image's name, unique in the table (NIH's file
  name; the path relative to the image root for the other layouts);
- ``Patient ID`` (:data:`PATIENT_COLUMN`): the patient (integers for NIH, text elsewhere);
- ``path`` (:data:`PATH_COLUMN`): the image file, once the images have been looked for;
- one column per label, in the dataset's order: 1 positive, 0 negative, -1 uncertain
  (:data:`UNCERTAIN`) and NaN unknown (not mentioned);
- where the dataset has them: ``View Position`` (PA / AP / LATERAL ...), ``Patient Gender``
  (M / F), ``age_years``, ``Frontal/Lateral``, and ``source_split`` (the dataset's own split).

The label vocabularies live in :mod:`cxr.labels`; they are re-exported here so that a reader
of tables needs this module only.
"""

from __future__ import annotations

from cxr.labels import (
    CHEXPERT_LABELS,
    GOOGLE2019_LABELS,
    MIMIC_LABELS,
    NO_FINDING,
    PATHOLOGIES,
)

IMAGE_COLUMN = "Image Index"
PATIENT_COLUMN = "Patient ID"
PATH_COLUMN = "path"
VIEW_COLUMN = "View Position"
SEX_COLUMN = "Patient Gender"
# The age as the table writes it (NIH's ``058Y`` or plain years), kept beside age_years.
AGE_COLUMN = "Patient Age"
AGE_YEARS_COLUMN = "age_years"
# Where a layout tells frontal from lateral apart from the view position (CheXpert).
FRONTAL_LATERAL_COLUMN = "Frontal/Lateral"
# Where a layout has its own split (CheXpert train / valid, MIMIC train / validate / test).
SOURCE_SPLIT_COLUMN = "source_split"

# Label cells: positive, negative, uncertain; blank (unknown) is NaN.
UNCERTAIN = -1.0
LABEL_VALUES = (1.0, 0.0, UNCERTAIN)
FRONTAL_VIEWS = ("PA", "AP")

# Columns cxr itself puts in an image table: a user's column of the same name is not kept.
OWN_COLUMNS = frozenset(
    {
        IMAGE_COLUMN,
        PATIENT_COLUMN,
        PATH_COLUMN,
        VIEW_COLUMN,
        SEX_COLUMN,
        AGE_COLUMN,
        AGE_YEARS_COLUMN,
        SOURCE_SPLIT_COLUMN,
    }
)

__all__ = [
    "AGE_COLUMN",
    "AGE_YEARS_COLUMN",
    "CHEXPERT_LABELS",
    "FRONTAL_LATERAL_COLUMN",
    "FRONTAL_VIEWS",
    "GOOGLE2019_LABELS",
    "IMAGE_COLUMN",
    "LABEL_VALUES",
    "MIMIC_LABELS",
    "NO_FINDING",
    "OWN_COLUMNS",
    "PATHOLOGIES",
    "PATH_COLUMN",
    "PATIENT_COLUMN",
    "SEX_COLUMN",
    "SOURCE_SPLIT_COLUMN",
    "UNCERTAIN",
    "VIEW_COLUMN",
]
