"""The Python face of cxr: what ``import cxr`` exports (:mod:`cxr` lists it).

One module per kind of thing a user holds: :mod:`.dataset` (``open_dataset`` ->
:class:`Dataset`), :mod:`.runs` (``train`` -> :class:`Run`, ``Run.evaluate`` ->
:class:`Evaluation`) and :mod:`.models` (``load_model`` -> :class:`Model`). Each is a thin
layer over the workflows the CLI calls, so the numbers are the same either way.
"""

from cxr.api.dataset import Dataset, open_dataset
from cxr.api.models import Model, load_model
from cxr.api.runs import Calibration, ClassResult, Evaluation, ExternalEvaluation, Run, train

__all__ = [
    "Calibration",
    "ClassResult",
    "Dataset",
    "Evaluation",
    "ExternalEvaluation",
    "Model",
    "Run",
    "load_model",
    "open_dataset",
    "train",
]
