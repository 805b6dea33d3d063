"""``cxr.load_model``: a trained model (a run, a bundle or an ONNX export) to predict and
explain with from Python, giving what ``cxr predict`` and ``cxr explain`` give."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.errors import CxrError, ImageError

if TYPE_CHECKING:
    from cxr.data.files import FileError, FoundImages
    from cxr.engine.inference import Predictions, Predictor
    from cxr.model.card import ModelCard

log = logging.getLogger(__name__)

ImagePaths = str | os.PathLike | Sequence[str | os.PathLike]


class Model:
    """A model ready for inference, with its labels, thresholds and preprocessing.

    Made by :func:`load_model`. :meth:`predict` returns the table ``cxr predict --out x.csv``
    writes; :meth:`explain` the Grad-CAM maps ``cxr explain`` writes as ``.npy``.
    """

    def __init__(self, predictor: Predictor, source: Path):
        self._predictor = predictor
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Model(source={str(self.source)!r}, labels={len(self.labels)}, "
            f"image_size={self.image_size}, backend={self.backend!r})"
        )

    @property
    def labels(self) -> list[str]:
        return list(self._predictor.labels)

    @property
    def thresholds(self) -> dict[str, float]:
        """Each label's decision threshold: a probability at or above it is called positive."""
        return dict(zip(self._predictor.labels, map(float, self._predictor.thresholds)))

    @property
    def image_size(self) -> int:
        return int(self._predictor.image_size)

    @property
    def backend(self) -> str:
        return self._predictor.backend

    @property
    def card(self) -> ModelCard | None:
        """The model card (training data, method, test results, limitations), if it has one."""
        return self._predictor.meta.card

    @property
    def about(self) -> dict[str, Any]:
        """What every answer says about the model: its training data and intended use."""
        return self._predictor.about()

    @property
    def predictor(self) -> Predictor:
        """The :class:`cxr.engine.inference.Predictor` behind it (batches of tensors in)."""
        return self._predictor

    @property
    def torch_module(self):
        """The underlying ``torch.nn.Module`` (logits out; ``None`` for an ONNX file)."""
        return self._predictor.torch_model

    def predict(
        self,
        images: ImagePaths,
        *,
        batch_size: int = 16,
        workers: int | None = 0,
        on_error: str = "raise",
    ) -> pd.DataFrame:
        """Probabilities and calls for PNG, JPEG and DICOM files (folders are searched).

        One row per image, in input order: ``file``, ``prob_<label>`` for each label,
        ``call_<label>`` (1 positive, 0 negative) and, where the model has an
        out-of-distribution summary, ``ood_distance``, ``ood_percentile`` and ``ood_flag``:
        the columns and values of ``cxr predict --out predictions.csv``.

        An unreadable file raises :class:`cxr.errors.ImageError` naming every failed file
        (``on_error="raise"``), or is logged and left out (``on_error="skip"``).
        """
        return self.predictions(
            images, batch_size=batch_size, workers=workers, on_error=on_error
        ).table()

    def predictions(
        self,
        images: ImagePaths,
        *,
        batch_size: int = 16,
        workers: int | None = 0,
        on_error: str = "raise",
        explain_dir: str | os.PathLike | None = None,
        on_found: Callable[[FoundImages], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_file_error: Callable[[FileError], None] | None = None,
    ) -> Predictions:
        """:meth:`predict` as a :class:`cxr.engine.inference.Predictions` (probabilities as
        an array, the failed and skipped files, the overlays written to ``explain_dir``).

        ``on_error="keep"`` returns the failures in ``.errors`` without raising (what
        ``cxr predict`` does, exiting 1). ``on_found`` sees what the search for images found
        before any prediction, ``on_progress`` each batch's count, ``on_file_error`` each
        file that fails while predicting."""
        from cxr.data.files import find_images
        from cxr.engine.inference import predict_files

        if on_error not in ("raise", "skip", "keep"):
            raise CxrError(f"on_error must be 'raise', 'skip' or 'keep', not {on_error!r}")
        found = find_images(_as_list(images))
        if on_found is not None:
            on_found(found)
        if not found.files:
            raise ImageError("no PNG, JPEG or DICOM files to predict")
        result = predict_files(
            self._predictor, found.files, batch_size=batch_size, workers=workers,
            explain_dir=explain_dir, on_progress=on_progress, on_error=on_file_error,
        )  # fmt: skip
        result.errors = list(found.errors) + result.errors
        result.skipped = list(found.skipped)
        if on_found is None:
            for entry in result.skipped:
                log.warning("skipped %s: %s", entry.file, entry.reason)
        if result.errors and on_error != "keep":
            if on_error == "raise":
                shown = "; ".join(f"{e.file}: {e.reason}" for e in result.errors[:5])
                more = f" (and {len(result.errors) - 5} more)" if len(result.errors) > 5 else ""
                raise ImageError(f"{len(result.errors)} file(s) failed: {shown}{more}")
            for error in result.errors:
                log.warning("left out %s: %s", error.file, error.reason)
        return result

    def explain(
        self,
        image: str | os.PathLike,
        labels: Sequence[str] | None = None,
        *,
        shifts: int = 1,
    ) -> dict[str, np.ndarray]:
        """Grad-CAM maps of one image: ``{label: [S, S] float32 in [0, 1]}`` over the
        model's ``S`` x ``S`` centre crop, for ``labels`` (default: those called positive,
        else the three most probable - ``cxr explain``'s choice). These are the arrays
        ``cxr explain`` writes as ``<image>/<label>.npy``."""
        from cxr.data.transforms import prepare_image
        from cxr.explain.gradcam import gradcam_with_logits
        from cxr.explain.render import choose_pathologies
        from cxr.metrics import probabilities

        model = self._predictor.require_torch_model()
        if labels is not None:
            unknown = [name for name in labels if name not in self.labels]
            if unknown:
                raise CxrError(
                    f"unknown label(s) {', '.join(map(repr, unknown))}; this model has "
                    f"{', '.join(self.labels)}"
                )
        prepared = prepare_image(image, self._predictor.preprocess)
        device = next(model.parameters()).device
        with self._predictor.lock:
            maps, logits = gradcam_with_logits(
                model, prepared.tensor[None].to(device), list(range(len(self.labels))),
                shifts=shifts,
            )  # fmt: skip
        probs = probabilities(logits, self._predictor.temperature)[0]
        if labels is None:
            chosen, _ = choose_pathologies(
                probs, self._predictor.thresholds, mode="auto", labels=self.labels
            )
        else:
            chosen = [self.labels.index(name) for name in labels]
        return {self.labels[c]: np.asarray(maps[0][c], dtype=np.float32) for c in chosen}


def load_model(
    source: str | os.PathLike,
    *,
    device: str = "auto",
    backend: str = "auto",
) -> Model:
    """The model of a run folder, a bundle folder (``model.safetensors`` + ``model.json``),
    or an ONNX file written by ``cxr export``. ``backend`` ``auto`` is ``cxr predict``'s:
    onnxruntime on a CPU, PyTorch on CUDA; Grad-CAM always runs in PyTorch."""
    from cxr.engine.inference import load_predictor

    return Model(load_predictor(source, backend=backend, device=device), Path(source))


def _as_list(images: ImagePaths) -> list[str | os.PathLike]:
    if isinstance(images, (str, os.PathLike)):
        return [images]
    return list(images)
