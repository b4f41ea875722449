"""Checks of a scan's setup before anything starts: no process, file or folder is made.

A wrong PONI, mask, dark, flat, model, output folder, resume or CURVE key is found here, in
a second or two, as one :class:`SetupError` that says what to fix, instead of after the
workers and Prefect have started (and left a results file that blocks the corrected rerun).

Example:
    >>> import tempfile
    >>> from pipeline.config import PipelineConfig
    >>> config = PipelineConfig(scan_id="s", output_dir=Path(tempfile.mkdtemp()) / "out")
    >>> check_setup(config)
    >>> check_setup(config.model_copy(update={"inference": config.inference.model_copy(
    ...     update={"model": Path("/nowhere/model.safetensors")})}))
    Traceback (most recent call last):
    ...
    pipeline.preflight.SetupError: model file not found: /nowhere/model.safetensors
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.config import PipelineConfig, ScanSettings
from pipeline.sources.identity import FileStamp


class SetupError(ValueError):
    """A scan's setup cannot work: the message says what to fix."""


def check_output_folder(folder: Path) -> None:
    """:class:`SetupError` unless results can be written into ``folder`` (which may not
    exist yet: then a folder must be possible in its nearest existing parent). Tried by
    making and removing an empty folder there: permission bits do not tell for root, an
    immutable folder, a read-only mount or ``/proc``."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"the output folder {folder} cannot be made: {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".beamline-inn-probe-", dir=existing))
    except OSError as error:
        what = "is not writable" if existing == Path(folder).absolute() else "cannot be made"
        raise SetupError(
            f"the output folder {folder} {what} ({existing}: {error.strerror})"
        ) from error


def check_settings(settings: ScanSettings) -> None:
    """Check what every scan of ``settings`` needs; :class:`SetupError` (one line) for the
    first problem:

    - the PONI, mask, dark and flat files, and that they fit each other and the q grid
      (:class:`~pipeline.integration.LineOutIntegrator` is built once);
    - the model file (card found, weights matching its SHA-256);
    - the output folder writable;
    - the CURVE keys, when remote workers are accepted.
    """
    from pipeline.integration import LineOutIntegrator
    from pipeline.model import check_model_file
    from pipeline.transport.security import read_public_key, read_secret_key

    with _one_line():
        LineOutIntegrator(settings.integration, settings.grid.grid())
        check_model_file(settings.inference.model)
        check_output_folder(settings.output_dir)
        transport = settings.transport
        if transport.curve_secret_key is not None:
            read_secret_key(transport.curve_secret_key)
        if transport.curve_authorized_keys is not None:
            if not transport.curve_authorized_keys.is_dir():
                raise SetupError(
                    f"the folder of authorized keys {transport.curve_authorized_keys} is missing"
                )
            for public in sorted(transport.curve_authorized_keys.glob("*.key")):
                read_public_key(public)


def check_setup(
    config: PipelineConfig,
    resume: bool = False,
    manifest: Mapping[str, FileStamp] | None = None,
    retry_failed: bool = False,
) -> None:
    """Check everything a scan of ``config`` needs before it starts: its settings
    (:func:`check_settings`), and an existing results file only with ``resume``, of the
    same configuration and model, and not being written by another run
    (:mod:`pipeline.store.resume`, :mod:`pipeline.store.lock`); :class:`SetupError` (one
    line) for the first problem."""
    from pipeline.store.lock import ResultsLock
    from pipeline.store.resume import plan_output

    check_settings(config)
    with _one_line():
        if config.output_path.exists():
            ResultsLock(config.output_path).check()
        plan_output(config, resume, manifest, retry_failed)


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """Each check's own error (``ValueError``, ``OSError``) says what is wrong: as a
    :class:`SetupError`."""
    try:
        yield
    except SetupError:
        raise
    except (ValueError, OSError) as error:
        raise SetupError(str(error)) from error
