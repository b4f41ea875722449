"""The four ZeroMQ endpoints of a scan run.

- ``work``: line-outs from the feeder (binds, PUSH) to the inference workers (PULL);
- ``results``: posterior results and failure records to the writer (binds, PULL);
- ``acks``: the writer's acknowledgements and the processes' ready messages (feeder binds, PULL);
- ``control``: stop broadcasts from the feeder (binds, PUB) to every process (SUB).

Unset endpoints are ``ipc://`` sockets in the run's private directory, which never leave
the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pipeline.config imports this package
    from pipeline.config import TransportConfig


@dataclass(frozen=True)
class Endpoints:
    """Resolved endpoint URLs of one run."""

    work: str
    results: str
    acks: str
    control: str

    @classmethod
    def resolve(cls, transport: TransportConfig, run_dir: Path) -> Endpoints:
        """The configured URLs, or ``ipc://RUN_DIR/NAME`` for those left unset."""

        def url(name: str) -> str:
            configured = getattr(transport, name)
            return configured if configured else f"ipc://{run_dir.resolve() / name}"

        return cls(url("work"), url("results"), url("acks"), url("control"))
