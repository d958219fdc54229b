"""`status`: what the operator reports about a GLMFineTune (users never write it)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from glmtune.spec.base import SpecModel

Phase = Literal[
    "Pending",
    "Preparing",
    "Training",
    "Exporting",
    "Canary",
    "Deploying",
    "Serving",
    "Succeeded",
    "Failed",
    "Suspended",
]
PHASES: tuple[str, ...] = Phase.__args__
"""Every phase, in lifecycle order (Canary: with `serving.promotion`, the new model is gated on canary pods
before the rollout; Succeeded: trained and exported with serving disabled)."""


class Condition(SpecModel):
    """A Kubernetes-style condition (type Ready, Trained, ...)."""

    type: str = Field(description="Condition type, e.g. `DataReady`, `Trained`, `Exported`, `Ready`.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, description="One CamelCase word saying why.")
    message: str | None = Field(None, description="Human-readable details.")
    last_transition_time: datetime | None = Field(None, description="When the status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition is about."
    )


class RunRecord(SpecModel):
    """One finished or running training run, newest last in `status.history`."""

    run: int = Field(ge=0, description="Run number.")
    phase: Phase = Field(description="Phase the run reached.")
    model_uri: str | None = Field(None, description="Exported model of the run.")
    started: datetime | None = Field(None, description="When the run started.")
    finished: datetime | None = Field(None, description="When the run ended.")


class GLMFineTuneStatus(SpecModel):
    """Progress written by the operator; unknown keys are kept (written by another operator version)."""

    model_config = ConfigDict(extra="allow")

    phase: Phase | None = Field(None, description="Current lifecycle phase.")
    conditions: list[Condition] = Field([], description="Detailed conditions.")
    run: int = Field(0, ge=0, description="Number of the current (or last) training run; 0 before the first.")
    job_name: str | None = Field(None, description="Name of the current PyTorchJob.")
    model_uri: str | None = Field(None, description="URI of the model being served (the last good export).")
    model_manifest_sha256: str | None = Field(
        None, description="sha256 of the served export's glmtune-manifest.json (what the servers loaded)."
    )
    data_versions: dict[str, str] = Field(
        {}, description="Data object key → ETag/version the current run trained on (for S3 drop detection)."
    )
    history: list[RunRecord] = Field([], description="The last runs, newest last.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation of the spec the operator last acted on."
    )
    training_fingerprint: str | None = Field(
        None, description="Hash of the training fields the current run was started from (a change starts a new run)."
    )
    export_uri: str | None = Field(None, description="Where the current run exports (`<output.uri>/run-N`).")
    candidate_uri: str | None = Field(None, description="Export being rolled out, until its pods are Ready.")
    candidate_manifest_sha256: str | None = Field(
        None, description="sha256 of the candidate export's glmtune-manifest.json."
    )
    rollout_started: datetime | None = Field(None, description="When the current rollout began (health gate).")
    data_listed_at: datetime | None = Field(None, description="When `dataVersions` was listed.")
    report_uri: str | None = Field(
        None, description="The training report (`report.html`) of the last verified export, when it has one."
    )
    canary_stage: Literal["Starting", "Observing"] | None = Field(
        None,
        description="Phase Canary: `Starting` until the canary pods are ready and answered the golden prompts, "
        "then `Observing` (their metrics are watched for serving.promotion.canary.durationSeconds).",
    )
    canary_started: datetime | None = Field(None, description="When the canary Deployment was created.")
    canary_observed_since: datetime | None = Field(
        None, description="When the canary passed the golden prompts and its watch began."
    )
