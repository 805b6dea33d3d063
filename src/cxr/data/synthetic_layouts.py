"""SYNTHETIC datasets laid out like CheXpert and MIMIC-CXR-JPG, from the NIH-style renderer.

The images are those of :mod:`cxr.data.synthetic_render` (the same renderer, the same planted NIH
findings); only the tables, the paths and the label vocabulary differ, so that a user or a test
without those datasets can run every command on their layouts offline. It is not CheXpert or
MIMIC data and not medical data.

Each row of the NIH-style population (:func:`cxr.data.synthetic_render.sample_population`) becomes
one study of its patient: a frontal image (AP or PA) and, for a seeded fraction of studies, a
lateral one (a plain lateral drawing without findings: it is only there for the view filter to
take out). The study's 14 observations come from its rendered NIH findings through
``_NIH_TO_CHEXPERT`` and then, like CheXpert's report labeller, a seeded fraction of the cells
is made uncertain (-1) and most negatives are left blank (not mentioned):

- a rendered finding's observations are 1, or -1 with probability ``UNCERTAIN_POSITIVE``;
- any other observation the renderer can draw is blank (``BLANK_NEGATIVE``), -1
  (``UNCERTAIN_NEGATIVE``) or else 0; those it never draws (Enlarged Cardiomediastinum,
  Fracture, Support Devices) are blank (``BLANK_NEGATIVE``) or 0;
- No Finding is 1 when no NIH finding was rendered and no cell of the study is -1, else
  blank (CheXpert's labeller never writes it as 0 or -1).

In the real CheXpert training table 73% of the cells are blank, 16% positive, 6% negative and
4.5% uncertain; these rates give roughly the same mix. CheXpert's ``valid.csv`` (separate
patients, the NIH population's test patients) holds the 0/1 truth only, as the real
validation set does. MIMIC's split is by subject: the NIH population's test patients are
``test``, a seeded tenth of the others ``validate``.

Deterministic for a seed whatever the number of workers; the streams are apart from the NIH
layout's, so that the same seed draws other patients than ``cxr data synth --layout nih``.
"""

from __future__ import annotations

import datetime
import gzip
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cxr import __version__
from cxr.data.layouts.chexpert import CHEXPERT_COLUMNS, CHEXPERT_LABELS
from cxr.data.synthetic_render import (
    README_MARKER,
    README_NAME,
    SynthSummary,
    _draw_population,
    _grid,
    _ramp,
    _smooth_noise,
    render_all,
    render_image,
    write_atomically,
)
from cxr.errors import ConfigError
from cxr.labels import MIMIC_LABELS, NO_FINDING, PATHOLOGIES

# The layouts written here (NIH's is cxr.data.synthetic's own).
LAYOUTS = ("chexpert", "mimic")

# The CheXpert observations each NIH finding shows as. Emphysema, Fibrosis and Hernia have no
# CheXpert observation of their own (the labeller would not mention them).
_NIH_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis", "Lung Opacity"),
    "Cardiomegaly": ("Cardiomegaly",),
    "Effusion": ("Pleural Effusion",),
    "Infiltration": ("Lung Opacity",),
    "Mass": ("Lung Lesion", "Lung Opacity"),
    "Nodule": ("Lung Lesion",),
    "Pneumonia": ("Pneumonia", "Lung Opacity"),
    "Pneumothorax": ("Pneumothorax",),
    "Consolidation": ("Consolidation", "Lung Opacity"),
    "Edema": ("Edema", "Lung Opacity"),
    "Emphysema": (),
    "Fibrosis": (),
    "Pleural_Thickening": ("Pleural Other",),
    "Hernia": (),
}
NOT_RENDERED = ("Enlarged Cardiomediastinum", "Fracture", "Support Devices")
UNCERTAIN_POSITIVE = 0.1
UNCERTAIN_NEGATIVE = 0.06
BLANK_NEGATIVE = 0.86

# The truth behind the labels: each image's study findings in NIH's spelling (drawn in the
# frontal view only), one row per image in rendering order (image i is drawn from
# default_rng([seed, stream, 1, i])).
FINDINGS_NAME = "synthetic_findings.csv"
CHEXPERT_ROOT = "CheXpert-v1.0-small"
CHEXPERT_LATERAL_FRACTION = 0.17  # of studies, as in CheXpert's training table
MIMIC_LATERAL_FRACTION = 0.5
MIMIC_VALIDATE_FRACTION = 0.1
MIMIC_CHEXPERT_NAME = "mimic-cxr-2.0.0-chexpert.csv.gz"
MIMIC_METADATA_NAME = "mimic-cxr-2.0.0-metadata.csv.gz"
MIMIC_SPLIT_NAME = "mimic-cxr-2.0.0-split.csv.gz"
# MIMIC-CXR-JPG's label table has its observation columns in alphabetical order; the reader
# reads them by name, into MIMIC_LABELS' order (cxr.labels).
MIMIC_FILE_LABEL_ORDER = tuple(sorted(MIMIC_LABELS))
MIMIC_METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
_VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
}
# Keys of the random streams: the NIH layout uses [seed, 0] and [seed, 1, i].
_STREAM = {"chexpert": 2, "mimic": 3}


# ---------------------------------------------------------------------------------------------
# Labels


def chexpert_truth(flags: np.ndarray) -> np.ndarray:
    """The 0/1 CheXpert observations (columns in ``CHEXPERT_LABELS`` order) of rows of 14 NIH
    flags, through ``_NIH_TO_CHEXPERT``; No Finding is 1 where no NIH finding is."""
    flags = np.asarray(flags, dtype=np.int64).reshape(-1, len(PATHOLOGIES))
    truth = np.zeros((len(flags), len(CHEXPERT_LABELS)), dtype=np.int64)
    for nih_index, nih_name in enumerate(PATHOLOGIES):
        for observation in _NIH_TO_CHEXPERT[nih_name]:
            column = CHEXPERT_LABELS.index(observation)
            truth[:, column] |= flags[:, nih_index]
    truth[:, CHEXPERT_LABELS.index(NO_FINDING)] = flags.sum(axis=1) == 0
    return truth


def labeller_noise(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a report labeller makes of ``truth``: 1 / 0 / -1 / NaN (blank); see the module
    docstring for the rates."""
    draw = rng.random(truth.shape)
    labels = np.where(
        truth == 1,
        np.where(draw < UNCERTAIN_POSITIVE, -1.0, 1.0),
        np.where(
            draw < BLANK_NEGATIVE,
            np.nan,
            np.where(draw < BLANK_NEGATIVE + UNCERTAIN_NEGATIVE, -1.0, 0.0),
        ),
    )
    never_drawn = [CHEXPERT_LABELS.index(name) for name in NOT_RENDERED]
    labels[:, never_drawn] = np.where(draw[:, never_drawn] < BLANK_NEGATIVE, np.nan, 0.0)
    no_finding = CHEXPERT_LABELS.index(NO_FINDING)
    others = np.delete(labels, no_finding, axis=1)
    clean = (truth[:, no_finding] == 1) & ~(others == -1).any(axis=1)
    labels[:, no_finding] = np.where(clean, 1.0, np.nan)
    return labels


# ---------------------------------------------------------------------------------------------
# The lateral view


def render_lateral(
    labels, rng: np.random.Generator, image_size: int
) -> tuple[np.ndarray, dict[str, tuple]]:
    """A plain lateral chest drawing (no findings: ``labels`` is ignored). Returns the
    ``(image_size, image_size)`` uint8 image and no boxes."""
    size = int(image_size)
    u, v = _grid(size)
    edge = max(1.5 / size, 0.006)
    cx, cy = 0.5 + float(rng.normal(0, 0.015)), 0.5 + float(rng.normal(0, 0.015))
    body_r = np.sqrt(((u - cx) / 0.36) ** 2 + ((v - cy) / 0.47) ** 2)
    body = _ramp((body_r - 1.0) * 0.36, 4 * edge)
    density = 0.03 + body * (0.5 + 0.03 * _smooth_noise(rng, size, 5))
    # The lungs fill the middle of the chest; the diaphragm cuts them from below.
    lung_r = np.sqrt(((u - cx - 0.02) / 0.25) ** 2 + ((v - cy + 0.05) / 0.33) ** 2)
    dome = cy + 0.2 + 0.12 * ((u - cx) / 0.3) ** 2 + float(rng.normal(0, 0.01))
    lung = _ramp((lung_r - 1.0) * 0.25, 2 * edge) * _ramp(v - dome, 1.5 * edge)
    density = density * (1 - lung) + lung * float(rng.uniform(0.2, 0.26))
    # The heart sits in front (image left) above the diaphragm; the spine runs behind.
    heart_r = np.sqrt(((u - cx + 0.1) / 0.13) ** 2 + ((v - cy - 0.1) / 0.14) ** 2)
    density = np.maximum(density, _ramp((heart_r - 1.0) * 0.13, 5 * edge) * 0.55)
    spine_x = cx + 0.25 + 0.04 * ((v - cy) / 0.45) ** 2
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * (v - cy) / 0.055)
    density = density + 0.2 * body * _ramp(np.abs(u - spine_x) - 0.04, 3 * edge) * vertebrae
    grain = rng.standard_normal((size, size), dtype=np.float32) * float(rng.uniform(0.008, 0.018))
    image = np.clip(np.clip(density, 0.0, 1.0) * float(rng.uniform(0.88, 1.0)) + grain, 0.0, 1.0)
    return np.round(image * 255.0).astype(np.uint8), {}


# ---------------------------------------------------------------------------------------------
# The shared population of studies


def _studies(layout: str, patients: int, seed: int, image_size: int) -> pd.DataFrame:
    """One row per study: the NIH population's row (its findings, age, sex, view, split),
    whether the study has a lateral view, and its 14 labels as the labeller writes them
    (``label:NAME``) and as drawn (``truth:NAME``)."""
    code = _STREAM[layout]
    table = _draw_population(patients, np.random.default_rng([seed, code, 0]), image_size)
    rng = np.random.default_rng([seed, code, 2])
    fraction = CHEXPERT_LATERAL_FRACTION if layout == "chexpert" else MIMIC_LATERAL_FRACTION
    table["lateral"] = rng.random(len(table)) < fraction
    truth = chexpert_truth(table[list(PATHOLOGIES)].to_numpy())
    labels = labeller_noise(truth, rng)
    for column, name in enumerate(CHEXPERT_LABELS):
        table[f"truth:{name}"] = truth[:, column]
        table[f"label:{name}"] = labels[:, column]
    return table


def _render_jobs(images: pd.DataFrame, staging: Path, seed: int, layout: str, size: int):
    """Render jobs for an image table with ``file`` (relative path), ``lateral`` and the NIH
    flags; folders are created here."""
    jobs = []
    flags = images[list(PATHOLOGIES)].to_numpy(dtype=np.int64)
    for i, (file, lateral) in enumerate(zip(images["file"], images["lateral_view"])):
        path = staging / file
        path.parent.mkdir(parents=True, exist_ok=True)
        renderer = render_lateral if lateral else render_image
        key = (seed, _STREAM[layout], 1, i)
        jobs.append((i, key, tuple(int(x) for x in flags[i]), size, str(path), renderer))
    return jobs


def _with_views(studies: pd.DataFrame) -> pd.DataFrame:
    """One row per image: each study's frontal view, then its lateral one where it has one."""
    frontal = studies.assign(lateral_view=False, view_number=1)
    lateral = studies[studies["lateral"]].assign(lateral_view=True, view_number=2)
    images = pd.concat([frontal, lateral]).sort_index(kind="stable")
    return images.reset_index(drop=True)


def write_layout(
    out: str | os.PathLike,
    layout: str,
    *,
    patients: int,
    image_size: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> SynthSummary:
    """Write a synthetic dataset in ``layout`` (``chexpert`` or ``mimic``) into ``out``, with
    the NIH writer's guard, staging folder and workers
    (:func:`cxr.data.synthetic.write_synthetic_dataset`)."""
    if layout not in _STREAM:
        raise ConfigError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    studies = _studies(layout, patients, seed, image_size)
    name_images = _chexpert_files if layout == "chexpert" else _mimic_files
    images = name_images(_with_views(studies), np.random.default_rng([seed, _STREAM[layout], 3]))

    def fill(staging: Path) -> SynthSummary:
        jobs = _render_jobs(images, staging, seed, layout, image_size)
        render_all(jobs, workers, progress)
        write_tables = _write_chexpert if layout == "chexpert" else _write_mimic
        write_tables(staging, images, image_size)
        findings = pd.DataFrame(
            {"path": images["file"], "Finding Labels": images["Finding Labels"]}
        )
        _write_text(staging / FINDINGS_NAME, _csv_text(findings))
        summary = SynthSummary(
            out=Path(out),
            images=len(images),
            patients=patients,
            image_size=image_size,
            boxes=0,
            label_counts={n: int((studies[f"label:{n}"] == 1).sum()) for n in CHEXPERT_LABELS},
            layout=layout,
        )
        _write_text(staging / README_NAME, _readme_text(summary, seed, len(studies)))
        return summary

    return write_atomically(out, fill)


# ---------------------------------------------------------------------------------------------
# CheXpert


def _chexpert_files(images: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Adds ``file``: CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_....jpg.
    Validation patients are numbered after the training ones, as in CheXpert."""
    del rng  # CheXpert's names are not random
    valid = images["split"] == "test"
    order = pd.concat([images.loc[~valid, "Patient ID"], images.loc[valid, "Patient ID"]])
    number = {patient: i + 1 for i, patient in enumerate(order.drop_duplicates())}
    files = []
    columns = ["split", "Patient ID", "Follow-up #", "view_number", "lateral_view"]
    for split, patient, follow_up, view_number, lateral in images[columns].to_numpy():
        folder = "valid" if split == "test" else "train"
        view = "lateral" if lateral else "frontal"
        files.append(
            f"{CHEXPERT_ROOT}/{folder}/patient{number[patient]:05d}/study{follow_up + 1}/"
            f"view{view_number}_{view}.jpg"
        )
    return images.assign(file=files, chexpert_patient=images["Patient ID"].map(number))


def _write_chexpert(staging: Path, images: pd.DataFrame, image_size: int) -> None:
    del image_size  # CheXpert's table has no image size
    ordered = images.sort_values(["chexpert_patient", "Follow-up #", "view_number"], kind="stable")
    lateral = ordered["lateral_view"].to_numpy()
    table = pd.DataFrame(
        {
            "Path": ordered["file"].to_numpy(),
            "Sex": ordered["Patient Gender"].map({"M": "Male", "F": "Female"}).to_numpy(),
            "Age": ordered["Patient Age"].to_numpy(),
            "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
            "AP/PA": np.where(lateral, "", ordered["View Position"].to_numpy()),
        }
    )
    valid = (ordered["split"] == "test").to_numpy()
    for name in CHEXPERT_LABELS:
        # valid.csv holds the truth (0/1), as CheXpert's radiologist-labelled validation set.
        cells = np.where(valid, ordered[f"truth:{name}"], ordered[f"label:{name}"])
        table[name] = cells.astype(np.float64)
    assert tuple(table.columns) == CHEXPERT_COLUMNS
    for name, rows in (("train.csv", ~valid), ("valid.csv", valid)):
        _write_text(staging / CHEXPERT_ROOT / name, _csv_text(table[rows]))


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG


def _mimic_files(images: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Adds MIMIC's ids (8-digit subject 1xxxxxxx, study 5xxxxxxx, hyphenated 40-hex dicom),
    ``file`` (files/pNN/pSUBJECT/sSTUDY/DICOM.jpg), ``mimic_split``, date, time and view."""
    patients = images["Patient ID"].drop_duplicates().to_numpy()
    subject_ids = 10_000_000 + rng.choice(10_000_000, size=len(patients), replace=False)
    subject = dict(zip(patients, subject_ids.tolist()))
    study_keys = images[["Patient ID", "Follow-up #"]].drop_duplicates()
    study_ids = 50_000_000 + rng.choice(10_000_000, size=len(study_keys), replace=False)
    study = dict(zip(map(tuple, study_keys.to_numpy()), study_ids.tolist()))
    days = _study_days(study_keys, rng)
    rest = [p for p, s in zip(images["Patient ID"], images["split"]) if s != "test"]
    rest = list(dict.fromkeys(rest))
    count = max(1, round(MIMIC_VALIDATE_FRACTION * len(rest))) if len(rest) >= 3 else 0
    validate = set(rng.permutation(np.array(rest, dtype=np.int64))[:count].tolist())
    out = images.assign(
        subject_id=images["Patient ID"].map(subject),
        study_id=[study[key] for key in zip(images["Patient ID"], images["Follow-up #"])],
        dicom_id=["-".join(h[i : i + 8] for i in range(0, 40, 8)) for h in _hexes(images, rng)],
        mimic_split=[
            "test" if s == "test" else "validate" if p in validate else "train"
            for p, s in zip(images["Patient ID"], images["split"])
        ],
    )
    out["StudyDate"] = [days[key][0] for key in zip(out["Patient ID"], out["Follow-up #"])]
    out["StudyTime"] = [days[key][1] for key in zip(out["Patient ID"], out["Follow-up #"])]
    lateral_kind = np.where(rng.random(len(out)) < 0.7, "LATERAL", "LL")
    out["ViewPosition"] = np.where(out["lateral_view"], lateral_kind, out["View Position"])
    out["file"] = [
        f"files/p{str(s)[:2]}/p{s}/s{t}/{d}.jpg"
        for s, t, d in zip(out["subject_id"], out["study_id"], out["dicom_id"])
    ]
    return out


def _hexes(images: pd.DataFrame, rng: np.random.Generator) -> list[str]:
    return [rng.bytes(20).hex() for _ in range(len(images))]


def _study_days(study_keys: pd.DataFrame, rng: np.random.Generator) -> dict:
    """(patient, follow-up) -> (StudyDate YYYYMMDD, StudyTime HHMMSS.fff); MIMIC's dates are
    shifted into 2100-2200, and a patient's studies follow each other."""
    result = {}
    start: dict[int, datetime.date] = {}
    for patient, follow_up in study_keys.itertuples(index=False):
        if patient not in start:
            start[patient] = datetime.date(
                int(rng.integers(2110, 2200)), 1, 1
            ) + datetime.timedelta(days=int(rng.integers(0, 365)))
        else:
            start[patient] += datetime.timedelta(days=int(rng.integers(1, 400)))
        seconds = float(rng.uniform(0, 86_400))
        hours, minutes = int(seconds // 3600), int(seconds % 3600 // 60)
        # MIMIC's StudyTime is the DICOM HHMMSS.FFF read as a number (no leading zeros).
        time = f"{hours * 10_000 + minutes * 100 + seconds % 60:.3f}"
        result[(patient, follow_up)] = (int(start[patient].strftime("%Y%m%d")), time)
    return result


def _write_mimic(staging: Path, images: pd.DataFrame, image_size: int) -> None:
    images = images.sort_values(["subject_id", "study_id", "view_number"], kind="stable")
    studies = images.drop_duplicates("study_id")
    labels = pd.DataFrame({"subject_id": studies["subject_id"], "study_id": studies["study_id"]})
    for name in MIMIC_FILE_LABEL_ORDER:
        labels[name] = studies[f"label:{name}"].astype(np.float64)
    frontal_view = images.groupby("study_id")["View Position"].first()
    has_lateral = images.groupby("study_id")["lateral_view"].any()
    procedure = [
        "CHEST (PORTABLE AP)"
        if frontal_view[s] == "AP"
        else "CHEST (PA AND LAT)"
        if has_lateral[s]
        else "CHEST (SINGLE VIEW)"
        for s in images["study_id"]
    ]
    metadata = pd.DataFrame(
        {
            "dicom_id": images["dicom_id"],
            "subject_id": images["subject_id"],
            "study_id": images["study_id"],
            "PerformedProcedureStepDescription": procedure,
            "ViewPosition": images["ViewPosition"],
            "Rows": image_size,
            "Columns": image_size,
            "StudyDate": images["StudyDate"],
            "StudyTime": images["StudyTime"],
            "ProcedureCodeSequence_CodeMeaning": procedure,
            "ViewCodeSequence_CodeMeaning": images["ViewPosition"].map(_VIEW_MEANING),
            "PatientOrientationCodeSequence_CodeMeaning": np.where(
                images["ViewPosition"] == "AP", "Recumbent", "Erect"
            ),
        }
    )
    assert tuple(metadata.columns) == MIMIC_METADATA_COLUMNS
    split = images[["dicom_id", "study_id", "subject_id", "mimic_split"]]
    split = split.rename(columns={"mimic_split": "split"})
    for name, table in (
        (MIMIC_CHEXPERT_NAME, labels),
        (MIMIC_METADATA_NAME, metadata),
        (MIMIC_SPLIT_NAME, split),
    ):
        _write_gzip(staging / name, _csv_text(table))


# ---------------------------------------------------------------------------------------------
# Files


def _csv_text(table: pd.DataFrame) -> str:
    buffer = io.StringIO()
    table.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def _write_gzip(path: Path, text: str) -> None:
    # mtime=0 and no stored name: the same table gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as handle:
        handle.write(text.encode("utf-8"))


def _readme_text(summary: SynthSummary, seed: int, studies: int) -> str:
    real = "CheXpert" if summary.layout == "chexpert" else "MIMIC-CXR-JPG"
    files = (
        f"\n  {CHEXPERT_ROOT}/train.csv, {CHEXPERT_ROOT}/valid.csv,\n  "
        f"{CHEXPERT_ROOT}/{{train,valid}}/patientNNNNN/studyN/viewN_{{frontal,lateral}}.jpg"
        if summary.layout == "chexpert"
        else f"\n  {MIMIC_CHEXPERT_NAME}, {MIMIC_METADATA_NAME},\n  {MIMIC_SPLIT_NAME}, "
        "files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg"
    )
    counts = "\n".join(f"  {name}: {count}" for name, count in summary.label_counts.items())
    return f"""{README_MARKER} {__version__}.

THIS IS NOT {real.upper()} DATA AND NOT MEDICAL DATA. Every image is a drawing made by a
program: a stylised chest radiograph with a planted pattern for each of its findings. Use it
to try the pipeline and to run tests, never to judge a model meant for real radiographs.

Layout: the same as {real}:{files}
The labels come from the planted NIH findings through a fixed map, then a seeded fraction is
made uncertain (-1) or left blank as a report labeller would (cxr.data.synthetic_layouts).
{FINDINGS_NAME} lists each image's study findings in NIH's names (drawn in the frontal
view; the lateral views are plain drawings).

Generation parameters:
  layout: {summary.layout}
  patients: {summary.patients}
  image_size: {summary.image_size}
  seed: {seed}

Contents:
  images: {summary.images} in {studies} studies
Studies labelled positive (1):
{counts}

Regenerate with cxr.data.synthetic.write_synthetic_dataset(out, layout="{summary.layout}",
patients={summary.patients}, image_size={summary.image_size}, seed={seed}); the files come out
byte-identical.
"""
