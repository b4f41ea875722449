"""The deployments of a beamline, read from one YAML file, served by ``beamline-inn serve``.

The file (``deploy/deployments.yaml`` is the annotated example) names up to five
deployments; each is optional:

- ``online``: ``online-reconstruction`` with the beamline's settings and detector stream (or
  watched folder), no schedule: operators start it from the UI (*Run*, where they may change
  the parameters, e.g. the scan id) and cancel it there;
- ``nightly``: ``reprocess-scans`` on a cron schedule, over glob patterns of archived scans
  (complete ones are skipped, so each night takes only what is new or unfinished);
- ``train``, ``validate``: ``train-model`` and ``validate-model``, started by hand;
- ``demo``: ``reconstruct-scan`` on simulated frames, to try the UI without a detector.

Each entry's fields are the flow's parameters (validated here, before anything is served,
with the flow's own types) plus ``name``, ``description``, ``tags`` and, for ``nightly``,
``cron`` and ``timezone``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import Flow
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from pydantic import BaseModel, ConfigDict, Field

from flows.model import train_model, validate_model
from flows.online import online_reconstruction
from flows.reprocess import reprocess_scans
from flows.scan import reconstruct_simulated_scan


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str | None = None
    tags: list[str] = Field(default_factory=lambda: ["beamline-inn"])
    #: the flow's parameters (defaults of a run from the UI, which may change them)
    parameters: dict[str, Any] = Field(default_factory=dict)


class _Scheduled(_Entry):
    #: a cron expression, e.g. "0 2 * * *" (02:00 every day)
    cron: str
    timezone: str = "UTC"


class Deployments(BaseModel):
    """The deployments file's contents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    online: _Entry | None = None
    nightly: _Scheduled | None = None
    train: _Entry | None = None
    validate_: _Entry | None = Field(None, alias="validate")
    demo: _Entry | None = None


#: The flow of each entry (Deployments' field names).
_FLOWS: dict[str, Flow[..., Any]] = {
    "online": online_reconstruction,
    "nightly": reprocess_scans,
    "train": train_model,
    "validate_": validate_model,
    "demo": reconstruct_simulated_scan,
}


def load_deployments(path: Path) -> list[RunnerDeployment]:
    """The deployments that ``path`` defines; ``ValueError`` (naming the entry) when one is
    malformed or its parameters do not fit its flow."""
    text = Path(path).read_text()
    try:
        document = Deployments.model_validate(yaml.safe_load(text) or {})
    except Exception as error:
        raise ValueError(f"{path}: {error}") from error
    deployments = []
    for field, flow in _FLOWS.items():
        entry = getattr(document, field)
        if entry is None:
            continue
        try:
            flow.validate_parameters(entry.parameters)
        except Exception as error:
            raise ValueError(f"{path}: {field.rstrip('_')}: {error}") from error
        schedule: dict[str, Any] = {}
        if isinstance(entry, _Scheduled):
            try:
                schedule["schedule"] = Cron(entry.cron, timezone=entry.timezone)
            except ValueError as error:
                raise ValueError(f"{path}: nightly: {error}") from error
        deployment = flow.to_deployment(
            name=entry.name,
            parameters=entry.parameters,
            description=entry.description or flow.description,
            tags=entry.tags,
            **schedule,
        )
        # Prefect's async_dispatch types it as the deployment or a coroutine: called outside
        # an event loop (as here), it is the deployment
        assert isinstance(deployment, RunnerDeployment)
        deployments.append(deployment)
    if not deployments:
        raise ValueError(f"{path} defines no deployment")
    return deployments
