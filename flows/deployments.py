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
``cron`` and ``timezone``. The parameters of ``online`` and ``nightly`` are those of the
operator's run form (:mod:`flows.operator`): the few an operator fills first, then
``expert``.

Every deployment, and so every run of it, is tagged (:func:`flows.operator.run_tags`):
``beamline-inn``, its kind (``scan:online``, ``scan:reprocess``, ``scan:demo``,
``model:train``, ``model:validate``), ``beamline:NAME`` for the file's top-level
``beamline`` (else the environment variable ``BEAMLINE_INN_BEAMLINE``), and the entry's own
``tags``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import RunnerDeployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.schedules import Cron
from pydantic import BaseModel, ConfigDict, Field

from flows.model import train_model, validate_model
from flows.online import online_reconstruction
from flows.operator import run_tags
from flows.reprocess import reprocess_scans
from flows.scan import reconstruct_simulated_scan


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str | None = None
    #: tags besides those every deployment of the file gets (flows.operator.run_tags)
    tags: list[str] = Field(default_factory=list)
    #: the flow's parameters (defaults of a run from the UI, which may change them)
    parameters: dict[str, Any] = Field(default_factory=dict)


class _Scheduled(_Entry):
    #: a cron expression, e.g. "0 2 * * *" (02:00 every day)
    cron: str
    timezone: str = "UTC"


class Deployments(BaseModel):
    """The deployments file's contents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the beamline's name, in the tags of every deployment and run (beamline:NAME)
    beamline: str | None = None
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
#: The kind of each entry's runs, a tag of theirs.
_KINDS = {
    "online": "scan:online",
    "nightly": "scan:reprocess",
    "train": "model:train",
    "validate_": "model:validate",
    "demo": "scan:demo",
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
            tags=list(dict.fromkeys(run_tags(_KINDS[field], document.beamline) + entry.tags)),
            **schedule,
        )
        # Prefect's async_dispatch types it as the deployment or a coroutine: called outside
        # an event loop (as here), it is the deployment
        assert isinstance(deployment, RunnerDeployment)
        deployments.append(deployment)
    if not deployments:
        raise ValueError(f"{path} defines no deployment")
    return deployments


#: Seconds a served deployment's run may stay Late (nothing started it) before it is failed.
UNSERVED_AFTER_S = 120.0
#: The fewest such seconds Prefect's automations allow (a proactive trigger's ``within``).
UNSERVED_AFTER_MIN_S = 10.0

#: The events of a flow run that leave the Late state: started, cancelled, ended, rescheduled.
_LEFT_LATE = {
    f"prefect.flow-run.{state}"
    for state in (
        "Pending",
        "Running",
        "Cancelling",
        "Cancelled",
        "Completed",
        "Failed",
        "Crashed",
        "Paused",
        "Scheduled",
    )
}


def unserved_runs_automation(
    deployment: RunnerDeployment, deployment_id: UUID, after_s: float
) -> AutomationCore:
    """A Prefect automation that fails a run of the deployment that stays Late (nothing
    started it) for ``after_s`` seconds, with a state message that says why, instead of
    leaving it Late for ever: the server acts on it, with or without ``serve`` running.

    It is not owned by the deployment: registering a deployment (as ``serve`` does each time
    it starts) deletes the automations it owns. A deployment deleted leaves its automation,
    which then matches nothing."""
    resource = f"prefect.deployment.{deployment_id}"
    message = (
        f"Nothing started this run within {after_s:g} s of it being late: no beamline-inn "
        f"serve serves {deployment.full_name} (its status in the UI: Not ready), or it is at "
        "its --limit. Start it (deploy/README.md) and run again."
    )
    return AutomationCore(
        name=_automation_name(deployment),
        description=f"Fails the runs of {deployment.full_name} that stay Late for {after_s:g} s "
        "(made by beamline-inn serve)",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": resource, "prefect.resource.role": "deployment"},
            after={"prefect.flow-run.Late"},
            expect=_LEFT_LATE,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.FAILED, name="Unserved", message=message)],
    )


def _automation_name(deployment: RunnerDeployment) -> str:
    return f"beamline-inn: unserved runs of {deployment.full_name}"


def fail_unserved_runs(deployments: list[RunnerDeployment], after_s: float) -> None:
    """Register ``deployments`` and set, for each, the automation that fails its runs that stay
    Late for ``after_s`` seconds (:func:`unserved_runs_automation`), in place of an earlier
    ``serve``'s; ``after_s`` 0 removes it (runs then stay Late until served)."""
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            deployment_id = deployment.apply()
            assert isinstance(deployment_id, UUID)  # (async_dispatch: called outside a loop)
            existing = client.read_automations_by_name(_automation_name(deployment))
            for old in existing:
                client.delete_automation(old.id)
            if after_s > 0:
                client.create_automation(
                    unserved_runs_automation(deployment, deployment_id, after_s)
                )
