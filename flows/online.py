"""``online-reconstruction``: the long-running flow of a beamtime, one live series per run.

It takes frames from a DECTRIS detector's stream or from a folder a detector writes into,
starts the writer and the local inference workers (remote workers on other nodes attach on
``transport.remote_work``), and runs until the series ends (its end message, or the idle
timeout) or the run is cancelled.

The stream is connected before the processes start (a detector, or ALBA's simulator, may
drop what it cannot send), so the first images can wait in the socket for the seconds the
workers take to start. That wait is reported, not hidden: a stream's exposures are timed
by the detector's own acquisition times (:class:`~pipeline.sources.DectrisStream`), the
scan's latencies and rate count from them, and the ``received`` stage says how long frames
waited before the hand-over; the results file keeps when each was taken from the socket
(``exposures/received_time``).

Cancelling (from the UI: Prefect's runner sends SIGTERM to the flow's process) is a clean
stop: the source stops taking frames, every frame already taken is integrated, inferred and
written, the results file is closed, the summary artifact is made, and only then does the
run end as *Cancelled*. The writer and workers are not in the flow's process group, so the
signal reaches only the flow, which stops them in order; should the runner's grace period
(30 s) run out, they still finish what they hold once the flow's process is gone.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from flows.scan import default_scan_id, final_state, reconstruct, run_name
from pipeline.config import SCAN_ID_PATTERN, ScanSettings
from pipeline.source_specs import LiveSource


@flow(
    name="online-reconstruction",
    flow_run_name=run_name("online", lambda parameters: parameters.get("scan_id")),
)
def online_reconstruction(
    settings: ScanSettings,
    source: LiveSource,
    scan_id: Annotated[str, Field(pattern=SCAN_ID_PATTERN)] | None = None,
) -> State:
    """Reconstruct one live series into ``settings.output_dir/SCAN_ID.h5`` (default scan id:
    ``online-YYYYmmdd-HHMMSS``, the run's start in UTC), watched in the UI; ends with the
    series or on cancellation (see the module docstring). The line-outs are on the grid of the
    settings' model (:func:`~pipeline.preflight.settings_for_model`). The run is named by the
    scan id, and ends as :func:`~flows.scan.final_state` says."""
    config = settings.for_scan(scan_id or default_scan_id("online"), source=source)
    return final_state(reconstruct(config), config.max_failed_fraction)
