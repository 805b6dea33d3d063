"""The service's 2xx answers as Pydantic models: what ``/openapi.json`` publishes and what
FastAPI checks each answer against (an answer that drifted from its model is a 500 in the
tests, never a silent change of contract). Errors are :mod:`cxr.serve.problems`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OodScore(BaseModel):
    """How far the image's pooled features lie from the validation images'."""

    model_config = ConfigDict(extra="allow")

    distance: float
    percentile: float = Field(description="Percent of validation images that lie closer.")
    flagged: bool = Field(description="Farther than the bundle's flag distance.")


class ModelAbout(BaseModel):
    """What the model is: part of every answer."""

    model_config = ConfigDict(extra="allow")

    trained_on: str
    synthetic: bool | None = Field(description="Trained on synthetic images (None: unknown).")
    origin: str | None = None
    intended_use: str
    ood: dict[str, Any] | None = Field(
        None, description="The out-of-distribution flag's rule (None: the bundle has none)."
    )


class Prediction(BaseModel):
    """One image's probabilities, calls and thresholds, per label."""

    model_config = ConfigDict(extra="allow")

    file: str = Field(description="The upload's file name, sanitised (never a path).")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    labels: list[str] = Field(description="The model's outputs, in order.")
    thresholds: dict[str, float] = Field(description="Per label: the call's threshold.")
    backend: str = Field(description="torch or onnx.")
    model: ModelAbout
    ood: OodScore | None = Field(description="None when the bundle has no OOD summary.")
    probabilities: dict[str, float] = Field(description="Per label, in [0, 1].")
    calls: dict[str, bool] = Field(description="Per label: probability >= threshold.")
    positive: list[str] = Field(description="The labels called positive.")


class ModelDescription(BaseModel):
    model_config = ConfigDict(extra="allow")

    labels: list[str]
    thresholds: dict[str, float]
    threshold_rule: str | None = None
    image_size: int
    normalization: str | None = None
    temperature: float | None = None
    backend: str
    about: ModelAbout


class Health(BaseModel):
    """Liveness, the model's description and the workers' state."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]
    model: ModelDescription
    decoding: dict[str, Any] = Field(description="The decoding workers: count, running, ...")
    batching: dict[str, Any] = Field(description="The batched worker's settings and queue.")


class ResultRow(BaseModel):
    """One DICOM instance the listener received (``cxr dicom listen``)."""

    model_config = ConfigDict(extra="allow")

    sop_instance_uid: str | None = Field(description="None for a refused association.")
    study_instance_uid: str | None
    sop_class_uid: str | None
    patient_ref: str | None = Field(description="A salted hash, never the patient ID.")
    calling_ae: str | None
    status: Literal["receiving", "received", "predicted", "sent", "refused", "failed"]
    reason: str | None
    received_at: datetime
    finished_at: datetime | None
    sent_at: datetime | None
    model_digest: str | None
    probabilities: dict[str, float] | None
    calls: dict[str, bool] | None
    attempts: int


class ResultsPage(BaseModel):
    """Rows of the results store, oldest first."""

    count: int = Field(ge=0)
    limit: int = Field(ge=1)
    results: list[ResultRow]
