"""The feeder: the process that runs a scan (DESIGN.md section 2), in parts, one job each:

- :mod:`~workers.feeder.feeder`: :class:`Feeder`, which composes the others (start, submit,
  collect, wait, stop);
- :mod:`~workers.feeder.integration`: an exposure placed in the results file, then a
  line-out or a failure record;
- :mod:`~workers.feeder.ledger`: the exposures in flight, the queue waiting for credit, the
  workers' credits, acknowledgements (no sockets, no clocks);
- :mod:`~workers.feeder.sockets`: the ``work``, ``acks``, ``control`` and ``to_writer``
  sockets;
- :mod:`~workers.feeder.supervisor`: the writer and local workers as child processes;
- :mod:`~workers.feeder.remote_work`: the endpoint of workers on other nodes;
- :mod:`~workers.feeder.metrics`: counts and latencies per stage;
- :mod:`~workers.feeder.reports`: :class:`ScanError`, :class:`ScanSummary`,
  :class:`RecentResult`, :class:`WriterRestarted`.
"""

from workers.feeder.feeder import Feeder
from workers.feeder.ledger import WorkerState
from workers.feeder.reports import (
    RECENT_RESULTS,
    RecentResult,
    ScanError,
    ScanSummary,
    WriterRestarted,
)

__all__ = [
    "RECENT_RESULTS",
    "Feeder",
    "RecentResult",
    "ScanError",
    "ScanSummary",
    "WorkerState",
    "WriterRestarted",
]
