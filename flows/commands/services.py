"""The commands that run services and set them up: ``worker`` (remote inference),
``serve`` (deployments) and ``keys`` (CURVE key pairs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands.arguments import Commands, positive_int
from flows.commands.console import use_prefect_api_for


def add_worker(commands: Commands) -> None:
    """``worker``: inference for feeders on other nodes."""
    worker = commands.add_parser(
        "worker",
        help="serve inference to feeders on another node (scan after scan)",
        description="Connect to a feeder's --remote-work address and draw posterior samples "
        "for its scans: the feeder sends the configuration and the model.",
    )
    worker.add_argument("--connect", required=True, metavar="URL", help="tcp://FEEDER-HOST:PORT")
    worker.add_argument("--key", type=Path, metavar="FILE", help="this worker's .key_secret")
    worker.add_argument(
        "--server-key", type=Path, metavar="FILE", help="the feeder's public .key file"
    )
    worker.add_argument("--threads", type=positive_int, help="torch threads (default: cores)")
    worker.add_argument("--device", default="auto", help="torch device (default auto: CUDA if any)")
    worker.add_argument("--once", action="store_true", help="exit after one scan")
    worker.set_defaults(run=_worker)


def _worker(args: argparse.Namespace) -> int:
    from workers.remote import RemoteWorker

    worker = RemoteWorker(
        args.connect,
        secret_key=args.key,
        server_key=args.server_key,
        threads=args.threads,
        device=args.device,
        log=lambda line: print(line, flush=True),
    )
    try:
        worker.serve(once=args.once)
    finally:
        worker.close()
    return 0


def add_serve(commands: Commands) -> None:
    """``serve``: a deployments file's deployments."""
    serve = commands.add_parser(
        "serve",
        help="serve the deployments of a YAML file (online, nightly reprocessing, ...) to a "
        "Prefect server",
    )
    serve.add_argument("deployments", type=Path, help="e.g. deploy/deployments.yaml")
    serve.add_argument(
        "--limit", type=positive_int, default=None, help="flow runs at once (default: no limit)"
    )
    serve.add_argument(
        "--fail-unserved-after",
        type=float,
        default=None,
        metavar="S",
        help="fail a run of these deployments that stays Late (nothing started it: serve is "
        "not running, or at its --limit) for S seconds, with a message that says so (default "
        "120, at least 10; 0: such runs stay Late until served)",
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    """Serve the deployments; the UI shows each one Ready while this runs (it polls for their
    runs) and Not ready a minute after it stopped (Prefect's foreman), and the server fails
    their runs that nothing starts (:func:`flows.deployments.fail_unserved_runs`)."""
    use_prefect_api_for(args.command)
    from prefect import serve
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import (
        UNSERVED_AFTER_MIN_S,
        UNSERVED_AFTER_S,
        fail_unserved_runs,
        load_deployments,
    )

    deployments = load_deployments(args.deployments)  # a bad file stops here
    if not PREFECT_API_URL.value():
        raise ValueError(
            "serve needs a Prefect server that outlives it: start one (prefect server start) and "
            "set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api (see deploy/README.md)"
        )
    unserved_after_s = args.fail_unserved_after
    if unserved_after_s is None:
        unserved_after_s = UNSERVED_AFTER_S
    if unserved_after_s != 0 and unserved_after_s < UNSERVED_AFTER_MIN_S:
        raise ValueError(
            f"--fail-unserved-after is 0 or at least {UNSERVED_AFTER_MIN_S:g} s (Prefect's "
            f"least for an automation's wait), not {unserved_after_s:g}"
        )
    # the server fails what stays Late, also while this command is not running
    fail_unserved_runs(deployments, unserved_after_s)
    for deployment in deployments:
        schedule = deployment.schedules[0].schedule if deployment.schedules else None
        when = f" on {schedule.cron}" if isinstance(schedule, CronSchedule) else ""
        print(f"serving {deployment.flow_name}/{deployment.name}{when}", flush=True)
    serve(*deployments, limit=args.limit)
    return 0


def add_keys(commands: Commands) -> None:
    """``keys``: CURVE key pairs."""
    keys = commands.add_parser(
        "keys",
        help="create CURVE key pairs for a feeder and its remote workers",
        description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600) for "
        "each NAME.",
    )
    keys.add_argument("names", nargs="+", metavar="NAME", help="e.g. feeder gpu-node-1")
    keys.add_argument("--dir", type=Path, default=Path("keys"), help="folder (default ./keys)")
    keys.set_defaults(run=_keys)


def _keys(args: argparse.Namespace) -> int:
    from pipeline.transport.security import create_keypair

    for name in args.names:
        public, secret = create_keypair(args.dir, name)
        print(f"{name}: public {public}  secret {secret}")
    print(
        "Give each worker its NAME.key_secret and the feeder's .key; put the workers' .key files "
        "in the folder passed to --authorized-keys (see deploy/README.md)."
    )
    return 0
