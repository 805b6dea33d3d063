"""Datasets beyond NIH's table: generic tables, CheXpert's and MIMIC-CXR-JPG's layouts, label
policies, splits of any label set, label maps and fine-tuning's head (issue 15).

References are independent of cxr's readers: pandas on the raw files, hand-counted numbers,
and scikit-learn's AUROC.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from cxr.data.datasets import (
    DatasetSpec,
    dataset_summary,
    label_matrix,
    read_dataset,
)
from cxr.data.split import read_split, split_by_patients, split_by_source, write_split
from cxr.errors import DataError
from cxr.labels import (
    CHEXPERT_LABELS,
    PATHOLOGIES,
    default_label_map,
    parse_label_map,
)
from cxr.metrics import auroc_per_class, bootstrap_auroc, classification_metrics

CHEXPERT_TABLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chexpert"


# ---------------------------------------------------------------------------- generic tables


@pytest.fixture
def generic(tmp_path: Path, sample_csv: Path, sample_images: Path) -> Path:
    """The real NIH sample renamed into another folder structure, with a table of our own:
    other column names, a patient id that is text, and some blank Atelectasis labels."""
    nih = pd.read_csv(sample_csv)
    rows = []
    for i, row in nih.iterrows():
        patient = int(row["Patient ID"])
        relative = Path("scans") / f"site{patient % 3}" / f"{row['Image Index'][:-4]}.png"
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).symlink_to(sample_images / row["Image Index"])
        found = row["Finding Labels"].split("|")
        rows.append(
            {
                "file": str(relative),
                "mrn": f"MRN-{patient:06d}",
                "sex": row["Patient Gender"],
                "view": row["View Position"],
                "Effusion": int("Effusion" in found),
                "Infiltration": int("Infiltration" in found),
                "Atelectasis": "" if i % 5 == 0 else int("Atelectasis" in found),
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def generic_spec(**changes) -> DatasetSpec:
    values = dict(image_col="file", patient_col="mrn", labels="Effusion,Infiltration,Atelectasis")
    return DatasetSpec(**{**values, **changes})


def test_generic_table_reads_every_image_with_its_labels(generic, sample_csv):
    data = read_dataset(generic / "labels.csv", generic_spec())
    raw = pd.read_csv(generic / "labels.csv")
    assert data.layout == "generic" and data.labels == ("Effusion", "Infiltration", "Atelectasis")
    assert len(data.table) == len(raw) == 264
    assert data.table["Patient ID"].nunique() == 260
    assert all(Path(p).is_file() for p in data.table["path"])
    matrix = label_matrix(data.table, data.labels)
    assert np.array_equal(np.isnan(matrix[:, 2]), raw["Atelectasis"].isna().to_numpy())
    assert (matrix[:, 0] == raw["Effusion"].to_numpy()).all()


def test_a_dataset_file_says_the_same_as_the_options(generic):
    (generic / "dataset.toml").write_text(
        'table = "labels.csv"\nimage_col = "file"\npatient_col = "mrn"\n'
        'labels = ["Effusion", "Infiltration", "Atelectasis"]\nsex_col = "sex"\nview_col = "view"\n'
    )
    from_file = read_dataset(generic)
    from_options = read_dataset(generic / "labels.csv", generic_spec())
    # Without --sex-col the sex and view columns are kept as other columns, as they are.
    shared = [c for c in from_options.table.columns if c not in ("sex", "view")]
    pd.testing.assert_frame_equal(
        from_file.table[shared], from_options.table[shared], check_dtype=False
    )
    assert set(from_file.table["Patient Gender"]) == {"M", "F"}
    assert from_options.table["sex"].tolist() == pd.read_csv(generic / "labels.csv")["sex"].tolist()


def test_label_columns_are_found_when_not_named(generic):
    data = read_dataset(generic / "labels.csv", generic_spec(labels=None))
    assert data.labels == ("Effusion", "Infiltration", "Atelectasis")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.drop(columns=["mrn"]), "missing column(s) 'mrn'"),
        (lambda t: t.assign(Effusion=t["Effusion"].astype(str).replace("1", "yes")),
         "label 'Effusion' is 'yes'; expected 1 (positive), 0 (negative), -1 (uncertain)"),
        (lambda t: t.assign(mrn=["", *t["mrn"][1:]]), "line 2: no patient id"),
        (lambda t: pd.concat([t, t.iloc[[3]]]), "line 266: image"),
    ],
)  # fmt: skip
def test_bad_generic_tables_name_the_file_the_row_and_the_problem(generic, edit, problem):
    table = pd.read_csv(generic / "labels.csv", dtype=str, keep_default_na=False)
    edit(table).to_csv(generic / "bad.csv", index=False)
    with pytest.raises(DataError) as caught:
        read_dataset(generic / "bad.csv", generic_spec())
    assert str(caught.value).startswith(str(generic / "bad.csv")), caught.value
    assert problem in str(caught.value)


def test_missing_images_are_named_or_dropped(generic):
    table = pd.read_csv(generic / "labels.csv", dtype=str, keep_default_na=False)
    table.loc[7, "file"] = "scans/nowhere/gone.png"
    table.to_csv(generic / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"1 of 264 listed image.*gone\.png.*--drop-missing"):
        read_dataset(generic / "labels.csv", generic_spec())
    data = read_dataset(generic / "labels.csv", generic_spec(), drop_missing=True)
    assert len(data.table) == 263 and data.dropped_missing == ["scans/nowhere/gone.png"]
    # The table alone is enough where images are not needed.
    assert len(read_dataset(generic / "labels.csv", generic_spec(), require_images=False).table)


def test_a_generic_split_round_trips_with_its_labels(generic, tmp_path):
    data = read_dataset(generic / "labels.csv", generic_spec(), require_images=False)
    split = split_by_patients(data.table, labels=data.labels, layout=data.layout, seed=3)
    write_split(split, tmp_path / "split")
    info = json.loads((tmp_path / "split" / "dataset.json").read_text())
    assert info == {"layout": "generic", "labels": list(data.labels)}
    frames = read_split(tmp_path / "split")
    patients = [set(frames[name]["Patient ID"]) for name in ("train", "val", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    together = pd.concat(frames.values()).set_index("Image Index").sort_index()
    expected = data.table.set_index("Image Index").sort_index()
    blank = expected["Atelectasis"].isna()
    assert together["Atelectasis"].isna().equals(blank)
    assert (together.loc[~blank, "Atelectasis"] == expected.loc[~blank, "Atelectasis"]).all()


# ---------------------------------------------------------------------------- CheXpert


@pytest.mark.slow
def test_real_chexpert_table_gives_the_published_figures():
    path = CHEXPERT_TABLE / "train.csv.gz"
    data = read_dataset(path, DatasetSpec(views=("all",)), require_images=False)
    stats = dataset_summary(data)
    assert (stats["images"], stats["patients"], stats["frontal"]) == (223_414, 64_540, 191_027)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    for label in CHEXPERT_LABELS:
        counts = raw[label].value_counts()
        expected = {
            "positive": int(counts.get("1.0", 0)),
            "negative": int(counts.get("0.0", 0)),
            "uncertain": int(counts.get("-1.0", 0)),
            "blank": int(counts.get("", 0)),
        }
        assert {k: stats["labels"][label][k] for k in expected} == expected, label


@pytest.mark.slow
def test_real_chexpert_table_splits_by_patient_without_leakage(tmp_path):
    data = read_dataset(CHEXPERT_TABLE / "train.csv.gz", require_images=False)
    assert len(data.table) == 191_027  # the frontal views by default
    split = split_by_patients(data.table, labels=data.labels, layout="chexpert", seed=0)
    write_split(split, tmp_path / "split")
    frames = read_split(tmp_path / "split")
    patients = {
        n: set(f["Image Index"].str.extract(r"(patient\d+)/")[0]) for n, f in frames.items()
    }
    assert not (patients["train"] & patients["test"] or patients["val"] & patients["test"])
    assert sum(len(f) for f in frames.values()) == 191_027


@pytest.fixture(scope="module")
def chexpert_synth(tmp_path_factory) -> Path:
    from cxr.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("chexpert") / "data"
    write_synthetic_dataset(out, patients=24, image_size=64, seed=2, layout="chexpert")
    return out


def test_chexpert_folder_reads_both_tables_and_keeps_frontal_views(chexpert_synth):
    data = read_dataset(chexpert_synth)
    root = chexpert_synth / "CheXpert-v1.0-small"
    raw = pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "valid.csv")])
    frontal = raw[raw["Frontal/Lateral"] == "Frontal"]
    assert sorted(data.table["Image Index"]) == sorted(frontal["Path"])
    assert any("left out" in note and "LATERAL" in note for note in data.notes)
    assert all(Path(p).is_file() for p in data.table["path"])
    every = read_dataset(chexpert_synth, DatasetSpec(views=("all",)))
    assert len(every.table) == len(raw)


def test_chexpert_official_split_tests_on_valid_csv(chexpert_synth):
    data = read_dataset(chexpert_synth, require_images=False)
    split = split_by_source(data.table, labels=data.labels, layout="chexpert", seed=0)
    valid = pd.read_csv(chexpert_synth / "CheXpert-v1.0-small" / "valid.csv")
    valid = valid[valid["Frontal/Lateral"] == "Frontal"]
    assert sorted(split.test["Image Index"]) == sorted(valid["Path"])
    assert set(split.train["Patient ID"]).isdisjoint(split.val["Patient ID"])


# ---------------------------------------------------------------------------- MIMIC


@pytest.fixture(scope="module")
def mimic_synth(tmp_path_factory) -> Path:
    from cxr.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("mimic") / "data"
    write_synthetic_dataset(out, patients=20, image_size=64, seed=4, layout="mimic")
    return out


def test_mimic_images_get_their_study_labels_and_official_split(mimic_synth):
    data = read_dataset(mimic_synth)
    meta = pd.read_csv(mimic_synth / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    labels = pd.read_csv(mimic_synth / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    splits = pd.read_csv(mimic_synth / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
    frontal = meta[meta["ViewPosition"].isin(["PA", "AP"])]
    frontal = frontal[frontal["study_id"].isin(labels["study_id"])]
    assert len(data.table) == len(frontal)
    row = data.table.iloc[0]
    dicom = Path(row["Image Index"]).stem
    study = labels[labels["study_id"] == str(row["study_id"])].iloc[0]
    for label in CHEXPERT_LABELS:
        expected = float(study[label]) if isinstance(study[label], str) else np.nan
        assert row[label] == expected or (np.isnan(row[label]) and np.isnan(expected)), label
    assert row["source_split"] == splits.set_index("dicom_id").loc[dicom, "split"]
    subject = str(row["Patient ID"])
    assert row["Image Index"].startswith(f"files/p{subject[:2]}/p{subject}/s{row['study_id']}/")
    split = split_by_source(data.table, labels=data.labels, layout="mimic")
    assert set(split.test["source_split"]) == {"test"} and set(split.val["source_split"]) == {
        "validate"
    }


def test_mimic_tables_with_a_bad_value_name_the_file_and_line(mimic_synth, tmp_path):
    folder = tmp_path / "mimic"
    folder.mkdir()
    for path in mimic_synth.glob("mimic-cxr-*.csv.gz"):
        (folder / path.name).write_bytes(path.read_bytes())
    table = pd.read_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    table.loc[2, "Edema"] = "maybe"
    with gzip.open(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as handle:
        table.to_csv(handle, index=False)
    with pytest.raises(DataError, match=r"chexpert\.csv\.gz, line 4: label 'Edema' is 'maybe'"):
        read_dataset(folder, require_images=False)


# ---------------------------------------------------------------------------- labels


def test_uncertain_policies_follow_irvin_et_al():
    frame = pd.DataFrame({"A": [1.0, 0.0, -1.0, np.nan], "B": [-1.0, -1.0, 1.0, 0.0]})
    ignore = label_matrix(frame, ["A", "B"], uncertain="ignore")
    assert np.array_equal(ignore, [[1, np.nan], [0, np.nan], [np.nan, 1], [np.nan, 0]], True)
    assert np.array_equal(
        label_matrix(frame, ["A", "B"], uncertain="zeros"), [[1, 0], [0, 0], [0, 1], [np.nan, 0]],
        equal_nan=True,
    )  # fmt: skip
    assert np.array_equal(
        label_matrix(frame, ["A", "B"], uncertain="ones"), [[1, 1], [0, 1], [1, 1], [np.nan, 0]],
        equal_nan=True,
    )  # fmt: skip


def test_metrics_leave_unknown_labels_out():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, size=(200, 3)).astype(float)
    prob = np.clip(truth * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    masked = truth.copy()
    masked[rng.random((200, 3)) < 0.3] = np.nan
    for column, value in enumerate(auroc_per_class(masked, prob)):
        known = ~np.isnan(masked[:, column])
        assert value == pytest.approx(roc_auc_score(truth[known, column], prob[known, column]))
    per_class = classification_metrics(masked, prob, [0.5] * 3, ["a", "b", "c"])
    known = ~np.isnan(masked[:, 0])
    assert per_class["a"]["positives"] == int(truth[known, 0].sum())
    assert per_class["a"]["unknown"] == int((~known).sum())
    boot = bootstrap_auroc(masked, prob, None, resamples=50, seed=1)
    assert np.isfinite(boot.per_class).all()


def test_default_label_map_between_nih_and_chexpert():
    mapping = default_label_map(PATHOLOGIES, CHEXPERT_LABELS)
    assert mapping["Pleural Effusion"] == ("Effusion",)
    assert mapping["Lung Lesion"] == ("Mass", "Nodule")
    assert mapping["Cardiomegaly"] == ("Cardiomegaly",)
    assert "Fracture" not in mapping and "No Finding" not in mapping
    back = default_label_map(CHEXPERT_LABELS, PATHOLOGIES)
    assert back["Effusion"] == ("Pleural Effusion",) and "Mass" not in back
    assert parse_label_map("Pleural Effusion=Effusion; Lung Lesion=Mass|Nodule") == {
        "Pleural Effusion": ("Effusion",),
        "Lung Lesion": ("Mass", "Nodule"),
    }
    with pytest.raises(DataError, match="expected DATA_LABEL=MODEL_LABEL"):
        parse_label_map("Effusion")


def test_fine_tuning_keeps_the_rows_of_the_same_findings(untrained_bundle):
    from cxr.model.factory import create_model

    model, note = create_model(str(untrained_bundle), CHEXPERT_LABELS)
    weights = load_file(str(untrained_bundle / "model.safetensors"))
    old_w, old_b = weights["classifier.weight"], weights["classifier.bias"]
    assert note["kept"] == {
        "Cardiomegaly": "Cardiomegaly", "Edema": "Edema", "Consolidation": "Consolidation",
        "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
        "Pleural Effusion": "Effusion",
    }  # fmt: skip
    for new, old in note["kept"].items():
        row, source = CHEXPERT_LABELS.index(new), PATHOLOGIES.index(old)
        assert np.array_equal(model.classifier.weight[row].detach(), old_w[source])
        assert float(model.classifier.bias[row].detach()) == float(old_b[source])
    fresh = CHEXPERT_LABELS.index("Fracture")
    assert not any(
        np.array_equal(model.classifier.weight[fresh].detach(), old_w[i]) for i in range(14)
    )
    first = next(k for k in weights if k.startswith("features."))
    assert np.array_equal(model.state_dict()[first], weights[first])


def test_a_parquet_table_reads_as_its_csv(generic):
    table = pd.read_csv(generic / "labels.csv", dtype=str, keep_default_na=False)
    table.to_parquet(generic / "labels.parquet")
    from_parquet = read_dataset(generic / "labels.parquet", generic_spec())
    from_csv = read_dataset(generic / "labels.csv", generic_spec())
    pd.testing.assert_frame_equal(from_parquet.table, from_csv.table)
