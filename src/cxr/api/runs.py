"""``cxr.train`` and ``cxr.Run``: a run folder from Python, with what ``cxr train`` and
``cxr evaluate`` write, as typed values (:class:`Evaluation`) instead of dicts."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.config import TrainConfig, load_config
from cxr.data.split import Split
from cxr.errors import ConfigError, DataError
from cxr.run import RunFolder

if TYPE_CHECKING:
    from cxr.api.dataset import Dataset
    from cxr.api.models import Model
    from cxr.engine.trainer import TrainCallbacks

# The patient bootstrap behind Evaluation.ci: the report's (cxr.report.numbers) defaults, so
# the intervals are the ones report.html shows.
CI_RESAMPLES = 1000
CI_SEED = 0
CI_CONFIDENCE = 0.95


@dataclass(frozen=True)
class ClassResult:
    """One label's test numbers: AUROC, the counts, and the confusion at its threshold."""

    label: str
    auroc: float | None
    positives: int
    negatives: int
    threshold: float
    sensitivity: float | None
    specificity: float | None
    tp: int
    fp: int
    fn: int
    tn: int


@dataclass(frozen=True)
class Evaluation:
    """A split's results, as ``cxr evaluate`` stores them in ``metrics.json``.

    ``auroc[label]`` (``None`` where a label has no positive or no negative), ``mean_auroc``
    over the defined ones, ``thresholds[label]`` (the calls' cut-offs, chosen on the
    validation split), ``ci[label]``: the 95 % patient-bootstrap interval of the AUROC (the
    report's), computed on first use from the stored predictions. :meth:`to_frame` is one row
    per label.
    """

    run: Path
    split: str
    images: int
    patients: int
    labels: tuple[str, ...]
    mean_auroc: float | None
    per_class: dict[str, ClassResult]
    threshold_rule: str | None
    predictions_file: Path
    raw: dict[str, Any] = field(repr=False)  # the metrics.json entry, as written

    @property
    def auroc(self) -> dict[str, float | None]:
        return {name: self.per_class[name].auroc for name in self.labels}

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: self.per_class[name].threshold for name in self.labels}

    @cached_property
    def ci(self) -> dict[str, tuple[float | None, float | None]]:
        report = self.raw.get("report")
        if report and "per_class" in report:
            return {n: tuple(report["per_class"][n]["auroc_ci"]) for n in self.labels}
        return self._bootstrap()["per_class"]

    @cached_property
    def mean_auroc_ci(self) -> tuple[float | None, float | None]:
        report = self.raw.get("report")
        if report and "auroc_mean_ci" in report:
            return tuple(report["auroc_mean_ci"])
        return self._bootstrap()["mean"]

    def predictions(self) -> pd.DataFrame:
        """The stored per-image table: ids, ``prob_``, ``true_`` and ``call_`` columns."""
        return pd.read_csv(self.predictions_file, dtype={"Patient ID": str})

    def to_frame(self) -> pd.DataFrame:
        """One row per label: auroc, ci_low, ci_high, threshold, sensitivity, specificity,
        positives, negatives."""
        rows = []
        for name in self.labels:
            entry = self.per_class[name]
            low, high = self.ci[name]
            rows.append(
                {
                    "label": name, "auroc": entry.auroc, "ci_low": low, "ci_high": high,
                    "threshold": entry.threshold, "sensitivity": entry.sensitivity,
                    "specificity": entry.specificity, "positives": entry.positives,
                    "negatives": entry.negatives,
                }
            )  # fmt: skip
        return pd.DataFrame(rows).set_index("label")

    def _bootstrap(self) -> dict[str, Any]:
        from cxr.metrics import bootstrap_auroc, percentile_interval

        table = self.predictions()
        truth = table[[f"true_{n}" for n in self.labels]].to_numpy(dtype=np.float64)
        prob = table[[f"prob_{n}" for n in self.labels]].to_numpy(dtype=np.float64)
        boot = bootstrap_auroc(
            truth, prob, table["Patient ID"].astype(str).to_numpy(), resamples=CI_RESAMPLES,
            seed=CI_SEED,
        )  # fmt: skip
        per_class = {
            name: percentile_interval(boot.per_class[:, c], CI_CONFIDENCE)
            if self.per_class[name].auroc is not None
            else (None, None)
            for c, name in enumerate(self.labels)
        }
        mean = percentile_interval(boot.mean, CI_CONFIDENCE)
        return {
            "per_class": per_class,
            "mean": mean if self.mean_auroc is not None else (None,) * 2,
        }

    @classmethod
    def from_metrics(cls, run: Path, entry: dict[str, Any]) -> Evaluation:
        per_class = {
            name: _class_result(name, values) for name, values in entry["per_class"].items()
        }
        return cls(
            run=run, split=entry["split"], images=entry["images"], patients=entry["patients"],
            labels=tuple(per_class), mean_auroc=entry["auroc_mean"], per_class=per_class,
            threshold_rule=entry.get("threshold_rule"),
            predictions_file=run / entry["predictions"], raw=entry,
        )  # fmt: skip


@dataclass(frozen=True)
class ExternalEvaluation:
    """The model scored on another dataset (``cxr evaluate RUN --data OTHER``): per label of
    that dataset answered by the model, its AUROC with a 95 % patient-bootstrap interval, and
    which model output(s) answered it (``label_map``)."""

    run: Path
    name: str
    layout: str
    split: str
    images: int
    patients: int
    mean_auroc: float | None
    mean_auroc_ci: tuple[float | None, float | None]
    auroc: dict[str, float | None]
    ci: dict[str, tuple[float | None, float | None]]
    label_map: dict[str, list[str]]
    not_scored: list[str]
    notes: list[str]
    predictions_file: Path
    raw: dict[str, Any] = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per scored label: auroc, ci_low, ci_high, positives, negatives, outputs."""
        rows = [
            {
                "label": name, "auroc": self.auroc[name], "ci_low": self.ci[name][0],
                "ci_high": self.ci[name][1], "positives": entry["positives"],
                "negatives": entry["negatives"], "model_outputs": "|".join(self.label_map[name]),
            }
            for name, entry in self.raw["per_class"].items()
        ]  # fmt: skip
        return pd.DataFrame(rows).set_index("label")

    @classmethod
    def from_metrics(cls, run: Path, entry: dict[str, Any]) -> ExternalEvaluation:
        per_class = entry["per_class"]
        return cls(
            run=run, name=entry["name"], layout=entry["layout"], split=entry["split"],
            images=entry["images"], patients=entry["patients"], mean_auroc=entry["auroc_mean"],
            mean_auroc_ci=tuple(entry["auroc_mean_ci"]),
            auroc={n: v["auroc"] for n, v in per_class.items()},
            ci={n: tuple(v["auroc_ci"]) for n, v in per_class.items()},
            label_map=entry["label_map"], not_scored=list(entry["dropped"]),
            notes=list(entry["notes"]), predictions_file=run / entry["predictions"], raw=entry,
        )  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """What ``cxr calibrate`` fitted on the validation split and stored in the bundle."""

    temperature: float
    previous_temperature: float
    prior_correction: bool
    logit_offsets: list[float]
    val_images: int
    val_nll_before: float
    val_nll_after: float
    val_ece_before: float | None
    val_ece_after: float | None
    threshold_rule: str
    thresholds: dict[str, float]
    previous_thresholds: dict[str, float]

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> Calibration:
        labels = result["labels"]
        values = {k: result[k] for k in cls.__dataclass_fields__ if k in result}
        values["thresholds"] = dict(zip(labels, map(float, result["thresholds"])))
        values["previous_thresholds"] = dict(zip(labels, map(float, result["previous_thresholds"])))
        return cls(**values)


class Run:
    """A run folder (``cxr train --out``): its config, split, training log, best model and
    results. ``Run(path)`` opens an existing one; :func:`train` makes one."""

    def __init__(self, path: str | os.PathLike):
        self._folder = RunFolder(path).require()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def path(self) -> Path:
        return self._folder.root

    @property
    def config(self) -> TrainConfig:
        return self._folder.load_config()

    @property
    def labels(self) -> tuple[str, ...]:
        return self._folder.labels

    @property
    def layout(self) -> str:
        return self._folder.dataset_info()["layout"]

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` as it is on disk."""
        return self._folder.read_metrics()

    @property
    def history(self) -> pd.DataFrame:
        """``log.csv``: one row per finished epoch (losses, val AUROCs, learning rate)."""
        if not self._folder.log_csv.exists():
            return pd.DataFrame()
        return pd.read_csv(self._folder.log_csv)

    def split(self, name: str) -> pd.DataFrame:
        """The run's ``train``, ``val`` or ``test`` image table."""
        return self._folder.read_split(name)

    def evaluate(
        self,
        split: str = "test",
        *,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 2,
        subgroups: Sequence[str] | None = (),
        on_batch: Callable[[int], None] | None = None,
    ) -> Evaluation:
        """Predict every image of ``split`` (``test``, ``val`` or a table of the run's
        layout) with the best model and store predictions and metrics, as ``cxr evaluate``
        does; ``subgroups`` names extra columns to analyse (``None``: no subgroup analysis)."""
        from cxr.workflows.evaluate import evaluate_run

        entry = evaluate_run(
            self.path, split, device=device, batch_size=batch_size, workers=workers,
            subgroups=subgroups, on_batch=on_batch,
        )  # fmt: skip
        return Evaluation.from_metrics(self.path, self._folder.read_metrics()[entry["split"]])

    def evaluate_external(
        self,
        data: str | os.PathLike,
        *,
        label_map: dict[str, list[str]] | str | None = None,
        split: str = "test",
        name: str | None = None,
        drop_missing: bool = False,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 2,
        **dataset_options: Any,
    ) -> ExternalEvaluation:
        """Score the model on another dataset (any layout ``open_dataset`` reads; its
        options as keywords), as ``cxr evaluate RUN --data OTHER`` does. ``label_map`` says
        which model output(s) answer each of its labels (a dict, or the CLI's text
        ``'Pleural Effusion=Effusion;Lung Lesion=Mass|Nodule'``); by default the same names,
        then the NIH / CheXpert / MIMIC map. ``split``: ``test`` (its own test split) or
        ``all``."""
        from cxr.data.datasets import DatasetSpec
        from cxr.labels import parse_label_map
        from cxr.workflows.external import external_evaluate

        if isinstance(label_map, str):
            label_map = parse_label_map(label_map)
        result = external_evaluate(
            self.path, data, dataset=DatasetSpec(**dataset_options), split=split,
            label_map=label_map, name=name, drop_missing=drop_missing, device=device,
            batch_size=batch_size, workers=workers,
        )  # fmt: skip
        return ExternalEvaluation.from_metrics(self.path, result)

    def calibrate(
        self,
        *,
        data: str | Path | None = None,
        label_map: Mapping[str, Sequence[str]] | str | None = None,
        drop_missing: bool = False,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 0,
        **dataset_options: Any,
    ) -> Calibration:
        """Prior correction and temperature scaling fitted on the validation split, and the
        thresholds refitted (``cxr calibrate``); stored in the run's bundle. An imported
        model is fitted on ``data``, a labelled set (any layout ``open_dataset`` reads; its
        options as keywords), which becomes its validation split."""
        from cxr.workflows.calibrate import calibrate_run

        result = calibrate_run(
            self.path, device=device, batch_size=batch_size, workers=workers,
            labelled=_labelled(data, label_map, drop_missing, dataset_options),
        )  # fmt: skip
        return Calibration.from_result(result)

    def fit_thresholds(
        self,
        rule: str = "youden",
        target_sensitivity: float = 0.9,
        *,
        data: str | Path | None = None,
        label_map: Mapping[str, Sequence[str]] | str | None = None,
        drop_missing: bool = False,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 0,
        **dataset_options: Any,
    ) -> dict[str, float]:
        """Per-class thresholds chosen on the validation split with ``rule`` (``youden``,
        ``sensitivity`` with ``target_sensitivity``, ``f1``), stored in the bundle, as
        ``cxr thresholds`` does; ``data`` as for :meth:`calibrate`. Returns them by label."""
        from cxr.workflows.calibrate import refit_thresholds

        result = refit_thresholds(
            self.path, rule, target_sensitivity, device=device, batch_size=batch_size,
            workers=workers, labelled=_labelled(data, label_map, drop_missing, dataset_options),
        )  # fmt: skip
        return dict(zip(result["labels"], map(float, result["thresholds"])))

    def evaluation(self, split: str = "test") -> Evaluation:
        """The stored results of an earlier evaluation of ``split`` (nothing is recomputed)."""
        metrics = self._folder.read_metrics()
        if split not in metrics or "per_class" not in metrics.get(split, {}):
            raise DataError(f"{self.path}: {split!r} has not been evaluated; run.evaluate() first")
        return Evaluation.from_metrics(self.path, metrics[split])

    def load_model(self, *, device: str = "auto", backend: str = "auto") -> Model:
        from cxr.api.models import load_model

        return load_model(self.path, device=device, backend=backend)

    def report(
        self,
        split: str = "test",
        *,
        data: str | Path | None = None,
        label_map: Mapping[str, Sequence[str]] | str | None = None,
        drop_missing: bool = False,
        resamples: int | None = None,
        gallery: int | None = None,
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 0,
        **dataset_options: Any,
    ) -> Path:
        """Write ``report.html`` (and its figures) for ``split``; returns its path.
        ``resamples`` (bootstrap resamples of patients) and ``gallery`` (Grad-CAM cases per
        class) default to ``cxr report``'s. An imported model is reported on ``data`` (as for
        :meth:`calibrate`), which becomes that split."""
        from cxr.workflows.report import report_run

        labelled = _labelled(data, label_map, drop_missing, dataset_options)
        sizes = {"resamples": resamples, "gallery": gallery}
        result = report_run(
            self.path, split=split, labelled=labelled, device=device, batch_size=batch_size,
            workers=workers, **{k: v for k, v in sizes.items() if v is not None},
        )  # fmt: skip
        return Path(result["html"])

    def resume(self, *, callbacks: TrainCallbacks | None = None, **runtime: Any) -> Run:
        """Continue training from the last checkpoint (``cxr train --resume``); only when and
        where it runs may change: max_epochs, max_plateaus, workers, device, amp, compile,
        cache."""
        from cxr.workflows.train import check_resume_cache, train_run

        allowed = {"max_epochs", "max_plateaus", "workers", "device", "amp", "compile", "cache"}
        refused = sorted(set(runtime) - allowed)
        if refused:
            raise ConfigError(
                "a resumed run keeps its data, split and method; cannot change "
                + ", ".join(refused)
            )
        if runtime.get("cache") is not None:
            runtime["cache"] = str(Path(runtime["cache"]).resolve())
        check_resume_cache(self.path, runtime.get("cache"))
        changed = {k: v for k, v in runtime.items() if v is not None}
        if changed:
            config = self._folder.load_config().updated(**changed)
            self._folder.write_json(self._folder.config, config.to_dict())
        train_run(self.path, resume=True, callbacks=callbacks)
        return self


def train(
    data: Dataset | str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: Split | str | os.PathLike | None = None,
    config: TrainConfig | str | os.PathLike | None = None,
    callbacks: TrainCallbacks | None = None,
    **options: Any,
) -> Run:
    """Train a model (``cxr train DATA --out OUT``) and return its :class:`Run`.

    ``data`` is a :class:`cxr.Dataset` (used as it is, a subset too) or a dataset path (read
    as ``cxr train`` reads it). ``split`` is a :class:`cxr.data.split.Split` (``ds.split()``)
    or a split folder; by default the dataset is split by patient (10 % val, 20 % test).
    ``options`` are ``cxr train``'s option names (``image_size=``, ``lr=``, ``max_epochs=``,
    ``weights=``, ``device=``, ...) over ``config`` (a :class:`cxr.config.TrainConfig` or a
    JSON / TOML file). ``callbacks`` sees each step and epoch
    (:class:`cxr.engine.trainer.TrainCallbacks`). Under ``torchrun`` use the CLI.
    """
    from cxr.api.dataset import Dataset
    from cxr.outputs import output_folder
    from cxr.workflows.train import create_run, train_run

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    base = config or TrainConfig()
    if options.get("cache") is not None:
        options["cache"] = str(Path(options["cache"]).resolve())
    train_config = base.updated(**options)
    out = output_folder(out)
    given_split = split if isinstance(split, Split) else None
    split_dir = None if split is None or given_split is not None else Path(split)
    if isinstance(data, Dataset):
        if not data.has_images:
            raise DataError(
                f"{data.source}: opened without its images; to train, open it with "
                "cxr.open_dataset(..., require_images=True) (the default)"
            )
        found = data._labeled()
        create_run(
            data.source, out, train_config, split_dir=split_dir, dataset=data.spec,
            found=found, split=given_split,
        )  # fmt: skip
    else:
        if given_split is not None:
            raise ConfigError("a Split object comes from a Dataset: pass that Dataset as data")
        create_run(Path(data), out, train_config, split_dir=split_dir)
    train_run(out, callbacks=callbacks)
    return Run(out)


def _class_result(name: str, values: dict[str, Any]) -> ClassResult:
    keys = ("auroc", "positives", "negatives", "threshold", "sensitivity", "specificity")
    return ClassResult(
        label=name,
        **{k: values[k] for k in keys},
        **{k: values[k] for k in ("tp", "fp", "fn", "tn")},
    )


def _labelled(data, label_map, drop_missing: bool, dataset_options: dict[str, Any]):
    """A labelled set for an imported bundle's split (:mod:`cxr.workflows.labelled`)."""
    if data is None:
        if dataset_options or label_map is not None:
            raise DataError("dataset options and label_map apply only with data=")
        return None
    from cxr.data.datasets import DatasetSpec
    from cxr.labels import parse_label_map
    from cxr.workflows.labelled import LabelledSet

    if isinstance(label_map, str):
        label_map = parse_label_map(label_map)
    return LabelledSet(
        data, DatasetSpec(**dataset_options), label_map=label_map, drop_missing=drop_missing
    )
