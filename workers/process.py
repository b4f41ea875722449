"""What every pipeline process shares: reading its run directory, obeying stop broadcasts, and
noticing when the process that started it has gone.

A run directory holds ``config.json`` (the :class:`~pipeline.config.PipelineConfig`); the
ZeroMQ endpoints follow from it (:meth:`~pipeline.transport.Endpoints.resolve`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import zmq

from pipeline.config import PipelineConfig
from pipeline.transport import Endpoints
from pipeline.transport.messages import Ready

CONFIG_FILE = "config.json"
#: A resumed scan's rows that the writer does not carry over (they are written again), as
#: JSON ``{"drop": [index, ...]}``.
RESUME_FILE = "resume.json"


class Parent:
    """Watches the parent process: a child whose feeder died (even by SIGKILL) must not run on
    forever, so it finishes what it holds and exits."""

    def __init__(self) -> None:
        self.pid = os.getppid()

    def alive(self) -> bool:
        return os.getppid() == self.pid


def read_run(run_dir: Path) -> tuple[PipelineConfig, Endpoints]:
    """The configuration and endpoints of the run in ``run_dir``."""
    config = PipelineConfig.model_validate_json((run_dir / CONFIG_FILE).read_text())
    return config, Endpoints.resolve(config.transport, run_dir)


def write_dropped_rows(run_dir: Path, indices: list[int]) -> None:
    """Tell the writer of a resumed scan which rows not to carry over (:data:`RESUME_FILE`)."""
    (run_dir / RESUME_FILE).write_text(json.dumps({"drop": sorted(indices)}))


def read_dropped_rows(run_dir: Path) -> list[int]:
    """The rows a resumed scan's writer does not carry over (none without the file)."""
    path = run_dir / RESUME_FILE
    if not path.is_file():
        return []
    return [int(index) for index in json.loads(path.read_text())["drop"]]


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's directory")
    parser.add_argument("--id", type=int, default=0, help="this process's number")
    parser.add_argument(
        "--resume", action="store_true", help="writer: continue the scan's existing file"
    )
    return parser.parse_args(argv)


def control_socket(context: zmq.Context, endpoints: Endpoints) -> zmq.Socket:
    """A SUB socket on the control endpoint, subscribed to every broadcast."""
    control = context.socket(zmq.SUB)
    control.setsockopt(zmq.SUBSCRIBE, b"")
    control.connect(endpoints.control)
    return control


def announce_ready(
    context: zmq.Context, endpoints: Endpoints, role: str, number: int, path: str = ""
) -> zmq.Socket:
    """Connect a PUSH socket to the acks endpoint and say this process (``path``: the file
    it writes) is ready; return it."""
    acks = context.socket(zmq.PUSH)
    acks.setsockopt(zmq.LINGER, 2000)
    acks.connect(endpoints.acks)
    acks.send_multipart(Ready(role=role, id=number, pid=os.getpid(), path=path).to_frames())
    return acks
