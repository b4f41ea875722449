"""The ``beamline-inn`` command line: the parser of every command, and :func:`main`, which
runs one and turns its errors, Ctrl-C and SIGTERM into a line and an exit code.

Each command's parser and handler live together in :mod:`flows.commands` (one module per
group of commands). Commands that need Prefect import it only when they run, so
``beamline-inn train`` starts fast.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import os
import signal
import sys
import threading
import time

from flows.commands import instrument, model, results, scans, services

#: Each command's ``add_*``, in the order ``beamline-inn --help`` lists them.
_COMMANDS = (
    scans.add_demo,
    scans.add_reprocess,
    scans.add_reprocess_scans,
    scans.add_online,
    services.add_worker,
    results.add_show,
    results.add_salvage,
    services.add_serve,
    services.add_keys,
    model.add_reference,
    instrument.add_instrument,
    model.add_validate,
    model.add_train,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``beamline-inn`` and its commands; each command's ``run`` default is
    its handler (``args.run(args)`` gives the exit code).

    >>> build_parser().parse_args(["show", "scan.h5"]).command
    'show'
    """
    parser = argparse.ArgumentParser(
        prog="beamline-inn",
        description="Streaming SAXS reconstruction: detector frames to posterior samples.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


#: The exit code of a command whose scan could not go on (:class:`~workers.feeder.ScanError`).
SCAN_STOPPED = 3


def _scan_error() -> type[Exception]:
    """:class:`~workers.feeder.ScanError`, imported only when an error is matched against it
    (the command line starts without the pipeline's modules)."""
    from workers.feeder import ScanError

    return ScanError


#: After "stopped on Ctrl-C ..." or "the scan stopped": how to finish the work, by command.
_AFTER_CTRL_C = {
    "demo": "; a demo is not resumed: run it again",
    "reprocess": "; resume with --resume",
    "reprocess-scans": "; run it again to resume the unfinished scans",
    "online": "; reprocess the saved frames with --resume to complete it",
    "train": "; with --checkpoint-dir, the same command resumes from the last checkpoint",
}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: child processes are stopped, files closed


#: A SIGINT this soon after the first is the same Ctrl-C, delivered twice: to the process
#: group and again by a wrapper that forwards it (``timeout``, a shell script's trap).
SAME_CTRL_C_S = 0.5


def _stop_on_ctrl_c(command: str, signum: int, frame: object) -> None:
    """The first Ctrl-C unwinds the command (``KeyboardInterrupt``): the scan's processes are
    stopped and its file closed; the next one exits at once."""
    first = time.monotonic()
    signal.signal(signal.SIGINT, functools.partial(_exit_at_once, command, first))
    raise KeyboardInterrupt


def _exit_at_once(command: str, first: float, signum: int, frame: object) -> None:
    """A second Ctrl-C (not within :data:`SAME_CTRL_C_S` of the first): exit now. The writer
    and workers, in sessions of their own, see this process gone and stop by themselves
    (every acknowledged exposure is in the file); the local Prefect API server, if any, is
    killed."""
    from flows.api import kill_local_server

    if time.monotonic() - first < SAME_CTRL_C_S:
        return

    kill_local_server()
    line = f"beamline-inn {command}: stopped at once on a second Ctrl-C\n"
    os.write(sys.stderr.fileno(), line.encode())
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments); its exit code, or 2
    after one line for bad input (``ValueError``, ``OSError``), :data:`SCAN_STOPPED` after
    two for a scan that could not go on, 130 on Ctrl-C (a second one exits at once)."""
    from flows.api import command_environment

    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    on_ctrl_c = functools.partial(_stop_on_ctrl_c, args.command)
    if main_thread:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        previous_sigint = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with command_environment():
            return args.run(args)
    except (ValueError, OSError) as error:  # bad input, missing or existing files: say so plainly
        print(f"beamline-inn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # a ScanInterrupted says what was written
        # the process ends next: its last garbage collection, over every object (torch's,
        # Prefect's), takes 1-2 s and is left out (the scan's threads have ended by now)
        atexit.register(gc.freeze)
        detail = f" {interrupt}" if str(interrupt) else ""
        after = _AFTER_CTRL_C.get(args.command, "")
        print(f"beamline-inn {args.command}: stopped on Ctrl-C{detail}{after}", file=sys.stderr)
        return 128 + signal.SIGINT
    except _scan_error() as error:  # the scan could not go on: what was acknowledged is written
        after = _AFTER_CTRL_C.get(args.command, "")
        print(f"beamline-inn {args.command}: the scan stopped: {error}", file=sys.stderr)
        print(
            f"beamline-inn {args.command}: the exposures acknowledged before it stopped were "
            f"written to the results file (unless the reason above is the file itself){after}",
            file=sys.stderr,
        )
        return SCAN_STOPPED
    finally:
        if main_thread and signal.getsignal(signal.SIGINT) is on_ctrl_c:  # no Ctrl-C came:
            signal.signal(signal.SIGINT, previous_sigint)  # an in-process caller's, back


if __name__ == "__main__":
    sys.exit(main())
