"""What operators see of the scan flows in the Prefect UI: the few fields of the run form
that they fill, and the tags that their runs carry.

The run form of a deployment (*Custom run*) lists a flow's parameters in their order, each
described by the flow's docstring (its ``Args`` section). The deployed scan flows
(``online-reconstruction``, ``reprocess-scans``) therefore take first what an operator
chooses (the scan id, where the frames come from, the PONI file, the mask, the model, the
output folder), then one optional object, ``expert``, with everything else
(:class:`~pipeline.config.ScanSettings`). :func:`operator_settings` joins them: a field the
operator fills wins over the same field in ``expert``.

Runs carry tags (:func:`run_tags`): ``beamline-inn``, their kind (``scan:online``,
``scan:reprocess``, ``scan:demo``, ``model:train``, ``model:validate``) and, where a
beamline is named (``beamline:`` in the deployments file, else the environment variable
``BEAMLINE_INN_BEAMLINE``), ``beamline:NAME``: the UI's run and deployment lists filter by
them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field

from pipeline.config import SCAN_ID_PATTERN, ScanSettings

#: A scan id as a flow parameter: it names the results file (no path separators).
ScanId = Annotated[str, Field(pattern=SCAN_ID_PATTERN)]

#: The tag of every run of beamline-inn.
PROJECT_TAG = "beamline-inn"
#: The environment variable that names the beamline in the tags of the commands' runs.
BEAMLINE_VARIABLE = "BEAMLINE_INN_BEAMLINE"


def operator_settings(
    expert: ScanSettings | None,
    *,
    poni: Path | None = None,
    mask: Path | None = None,
    model: str | None = None,
    output_dir: Path | None = None,
) -> ScanSettings:
    """``expert`` (default: the default settings) with the fields the operator filled: each
    one given (not ``None``) replaces the same field of ``expert``.

    Example:
        >>> expert = ScanSettings(output_dir=Path("/data/expert"))
        >>> settings = operator_settings(expert, model="default", output_dir=Path("/data/op"))
        >>> settings.output_dir, settings.inference.model, settings.integration.poni
        (PosixPath('/data/op'), PosixPath('default'), None)
    """
    settings = expert or ScanSettings()
    integration = {
        name: value for name, value in (("poni", poni), ("mask", mask)) if value is not None
    }
    update: dict[str, object] = {}
    if integration:
        update["integration"] = settings.integration.model_copy(update=integration)
    if model is not None:
        update["inference"] = settings.inference.model_copy(update={"model": Path(model)})
    if output_dir is not None:
        update["output_dir"] = output_dir
    return settings.model_copy(update=update) if update else settings


def run_tags(kind: str, beamline: str | None = None) -> list[str]:
    """The tags of a run of this kind (``scan:online``, ``model:train``, ...): the project's,
    the kind, and ``beamline:NAME`` for the beamline (default: the environment variable
    :data:`BEAMLINE_VARIABLE`; none when it is unset or empty).

    Example:
        >>> run_tags("scan:online", "ID13")
        ['beamline-inn', 'scan:online', 'beamline:ID13']
    """
    beamline = beamline or os.environ.get(BEAMLINE_VARIABLE, "").strip()
    return [PROJECT_TAG, kind] + ([f"beamline:{beamline}"] if beamline else [])
