"""Checks of a scan's setup before anything starts: no process, file or folder is made.

A wrong PONI, mask, dark, flat, model, output folder, resume or CURVE key is found here, in
a second or two, as one :class:`SetupError` that says what to fix, instead of after the
workers and Prefect have started (and left a results file that blocks the corrected rerun).
So is a geometry that does not match the model (:func:`check_geometry`): a model knows one
instrument (:class:`~pipeline.instrument.Instrument`: q grid, sector, pixels per bin), and
line-outs of another would give confident, wrong posteriors. The line-out grid of a scan is
its model's (:func:`settings_for_model`).

Example:
    >>> import tempfile
    >>> from pipeline.config import PipelineConfig
    >>> config = PipelineConfig(scan_id="s", output_dir=Path(tempfile.mkdtemp()) / "out")
    >>> check_setup(config)
    >>> check_setup(config.model_copy(update={"inference": config.inference.model_copy(
    ...     update={"model": Path("/nowhere/model.safetensors")})}))
    Traceback (most recent call last):
    ...
    pipeline.preflight.SetupError: model file not found: /nowhere/model.safetensors (bundled \
models: default, pilatus1m-5m-sector)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from pipeline.config import GridConfig, PipelineConfig, ScanSettings
from pipeline.sources.identity import FileStamp

if TYPE_CHECKING:
    from pipeline.instrument import Instrument
    from pipeline.integration import LineOutIntegrator

#: Counted up to each bin edge, the pixels may differ from the model's instrument by the
#: pixels of a bin beside the edge and this share of the instrument's (at least one pixel):
#: see :func:`check_geometry`.
PIXEL_TOLERANCE = 0.01
#: What to do about a geometry that does not match the model, in the messages.
TRAIN_ADVICE = (
    "train a model for this geometry (beamline-inn instrument, then beamline-inn train "
    "--instrument) or give the model trained for it (--model)"
)

AnySettings = TypeVar("AnySettings", bound=ScanSettings)


class SetupError(ValueError):
    """A scan's setup cannot work: the message says what to fix."""


class GeometryMismatch(SetupError):
    """The scan's geometry (PONI, mask, sector) gives the q bins of its model other pixels
    than the instrument the model was trained for (:func:`check_geometry`)."""


def settings_for_model(settings: AnySettings) -> AnySettings:
    """``settings`` (a :class:`ScanSettings` or :class:`PipelineConfig`) with the line-out
    grid of their model's instrument: a model takes line-outs on its own grid only.

    :class:`SetupError` (one line) for a model that is neither a file nor a bundled model's
    name, and for a grid set explicitly in ``settings`` (``"grid" in
    settings.model_fields_set``, say in a deployment's parameters) that is not the model's.
    The default model's grid is :class:`GridConfig`'s default.

    Example:
        >>> settings_for_model(ScanSettings()).grid == GridConfig()
        True
        >>> settings_for_model(ScanSettings(grid=GridConfig(n_points=100)))
        Traceback (most recent call last):
        ...
        pipeline.preflight.SetupError: the settings' grid (q 0.01-0.4 1/nm on 100 bins) is not \
the model 'default''s (q 0.01-0.4 1/nm on 512 bins): leave the grid out of the settings, the \
model's instrument sets it
    """
    from pipeline.model import read_card
    from pipeline.model.checkpoint import card_instrument, model_name

    with _one_line():  # the card only: check_settings checks the weights against it
        card = read_card(settings.inference.model)
        instrument = card_instrument(card)
    grid = GridConfig(
        q_min_nm=instrument.q_min_nm,
        q_max_nm=instrument.q_max_nm,
        n_points=instrument.n_points,
        resolution_nm=instrument.resolution_nm,
    )
    if settings.grid == grid:
        return settings
    if "grid" in settings.model_fields_set:
        raise SetupError(
            f"the settings' grid ({_describe_grid(settings.grid)}) is not the model "
            f"{model_name(card)!r}'s ({_describe_grid(grid)}): leave the grid out of the "
            "settings, the model's instrument sets it"
        )
    return settings.model_copy(update={"grid": grid})


def _describe_grid(grid: GridConfig) -> str:
    return f"q {grid.q_min_nm:g}-{grid.q_max_nm:g} 1/nm on {grid.n_points} bins"


def _sector(sector: tuple[float, float] | None) -> str:
    return (
        "on the full ring" if sector is None else f"in the sector {sector[0]:g}..{sector[1]:g} deg"
    )


def usable_pixel_q(integrator: LineOutIntegrator) -> np.ndarray:
    """q (1/nm) of the centre of every pixel that ``integrator`` may use (not masked, inside
    its sector), whatever its grid; the integrator must know its detector shape
    (:attr:`LineOutIntegrator.shape`).

    Example:
        >>> from pipeline.config import IntegrationConfig
        >>> from pipeline.integration import LineOutIntegrator
        >>> from pipeline.physics import QGrid
        >>> q = usable_pixel_q(LineOutIntegrator(IntegrationConfig(), QGrid()))
        >>> f"{q.min():.3g}-{q.max():.3g} 1/nm"
        '0-1.23 1/nm'
    """
    shape = integrator.shape
    if shape is None:
        raise ValueError("the integrator's detector shape is not known yet (no frame seen)")
    geometry = integrator.geometry
    usable = integrator.mask == 0
    sector = integrator.config.azimuth_range_deg
    if sector is not None:
        chi = np.degrees(geometry.center_array(shape, unit="chi_rad"))
        usable &= (chi >= sector[0]) & (chi <= sector[1])
    return np.asarray(geometry.center_array(shape, unit="q_nm^-1"))[usable]


def check_geometry(integrator: LineOutIntegrator, instrument: Instrument, model: str) -> None:
    """:class:`GeometryMismatch` (one line naming the model ``model``) unless ``integrator``
    is on the grid of ``instrument`` and its geometry (PONI, mask, dark's unusable pixels,
    sector) gives the instrument's q bins the pixels the model was trained with. Where the
    integrator does not know its detector shape yet (:attr:`LineOutIntegrator.shape` is
    ``None`` until the first frame: :func:`~pipeline.integration.frame_shape_is_open`), only
    the grid is checked: there are no pixels to count.

    The rule, over the bins the instrument observes (its masked bins are not compared):

    - every observed bin gets at least one pixel;
    - counted from the lowest q, the pixels up to each bin edge differ from the instrument's
      by at most the pixels of the larger of the two bins beside that edge (in the
      instrument), plus :data:`PIXEL_TOLERANCE` (1%) of the instrument's pixels up to there,
      at least one.

    Why not each bin's own count within a few percent: the pixel rows of a sector cross the
    bin edges together, so a recalibration that moves the edges by a small fraction of a bin
    moves whole rows between neighbouring bins. Measured on the default geometry, 0.5 mm more
    distance (of 5 m) changes 68 of its 512 bins by more than 5% (and a pixel), a tenth of
    a pixel of beam centre 225, while neither changes what the model sees (the edges move by
    less than a bin, and the instrument's resolution is two bins). Counting up to each edge,
    such moves stay within a bin; what this refuses is pixels that are not where the model
    expects them: another distance (1% of it), detector, wavelength, sector (±5.5 degrees
    instead of ±5), beam stop, module gap, or a mask that takes a cluster of pixels (5 x 5
    at q 0.03 1/nm, 30 x 30 at 0.25 1/nm). A mask of hot pixels passes: each takes one
    pixel, and up to 1% of the pixels may go (100 scattered over the sector pass). So does
    an instrument whose pixels were counted another way, where a few pixels at a bin edge
    fall on its other side (by pixel centres, or by an engine that rounds them otherwise).

    A card from before instruments knows no pixel counts: there, only that every observed
    bin gets a pixel is checked. The message gives the q range the geometry reaches (its
    usable pixels) and the one the model needs; where the geometry covers it, also at how
    many bin edges the pixels differ, and the worst.

    Example:
        >>> from pipeline.config import IntegrationConfig
        >>> from pipeline.instrument import default_instrument
        >>> from pipeline.integration import LineOutIntegrator
        >>> instrument = default_instrument()
        >>> check_geometry(LineOutIntegrator(IntegrationConfig(), instrument.grid), instrument,
        ...                "default")
        >>> ring = IntegrationConfig(azimuth_range_deg=None)
        >>> try:
        ...     check_geometry(LineOutIntegrator(ring, instrument.grid), instrument, "default")
        ... except GeometryMismatch as error:
        ...     print(str(error).split(" (worst")[0])
        the geometry reaches q 0-1.68 1/nm on the full ring, but in 512 of the 512 q bins the \
model 'default' observes (q 0.01-0.4 1/nm) the pixels are not where its instrument has them, in \
the sector -5..5 deg
    """
    grid = instrument.grid
    if integrator.grid != grid:
        raise GeometryMismatch(
            f"the line-out grid (q {integrator.grid.q_min_nm:g}-{integrator.grid.q_max_nm:g} "
            f"1/nm on {integrator.grid.n_points} bins) is not the model {model!r}'s "
            f"(q {grid.q_min_nm:g}-{grid.q_max_nm:g} 1/nm on {grid.n_points} bins): take the "
            "settings' grid from the model (pipeline.preflight.settings_for_model)"
        )
    if integrator.shape is None:  # no pixel counted before the first frame
        return
    observed = instrument.observed
    here = np.asarray(integrator.pixels_per_bin, np.int64)[observed]
    theirs = np.asarray(instrument.pixels_per_bin, np.int64)[observed]
    differ = here == 0
    if theirs.any():  # not for a card from before instruments: pixel counts unknown
        up_to_here, up_to_theirs = np.cumsum(here), np.cumsum(theirs)
        beside = np.maximum(theirs, np.append(theirs[1:], 0))  # the bins beside each edge
        allowed = beside + np.maximum(1.0, PIXEL_TOLERANCE * up_to_theirs)
        excess = np.abs(up_to_here - up_to_theirs) / allowed
        differ |= excess > 1.0
    if not differ.any():
        return
    q_observed = grid.q_nm[observed]
    needs = f"q {q_observed[0]:.3g}-{q_observed[-1]:.3g} 1/nm"
    where = _sector(integrator.config.azimuth_range_deg)
    q = usable_pixel_q(integrator)
    if q.size == 0:
        raise GeometryMismatch(
            f"the geometry has no usable pixel {where}; the model {model!r} needs {needs}: "
            f"{TRAIN_ADVICE}"
        )
    reaches = f"the geometry reaches q {q.min():.3g}-{q.max():.3g} 1/nm {where}"
    half = 0.5 * grid.bin_width_nm
    if q.min() > q_observed[0] + half or q.max() < q_observed[-1] - half:
        raise GeometryMismatch(f"{reaches}; the model {model!r} needs {needs}: {TRAIN_ADVICE}")
    theirs_where = (
        ""
        if integrator.config.azimuth_range_deg == instrument.azimuth_range_deg
        else f", {_sector(instrument.azimuth_range_deg)}"
    )
    if (here == 0).any():
        worst = int(np.flatnonzero(here == 0)[0])
        detail = f"q {q_observed[worst]:.3g} 1/nm: no pixel here, {theirs[worst]} in the model's"
    else:
        worst = int(np.argmax(excess))
        detail = (
            f"the bins up to q {q_observed[worst]:.3g} 1/nm: {up_to_here[worst]} pixels here, "
            f"{up_to_theirs[worst]} in the model's"
        )
    raise GeometryMismatch(
        f"{reaches}, but in {int(differ.sum())} of the {observed.sum()} q bins the model "
        f"{model!r} observes ({needs}) the pixels are not where its instrument has them"
        f"{theirs_where} (worst: {detail}): {TRAIN_ADVICE}"
    )


def checked_integrator(settings: ScanSettings) -> LineOutIntegrator:
    """The :class:`~pipeline.integration.LineOutIntegrator` of ``settings`` (their grid
    should be the model's: :func:`settings_for_model`), once :func:`check_geometry` found
    its geometry matching the model's instrument; :class:`GeometryMismatch` otherwise.

    Where nothing fixes the frames' shape before the first frame (a PONI naming no detector,
    and no mask, dark, flat or ``detector_shape``:
    :func:`~pipeline.integration.frame_shape_is_open`), there are no pixels to count yet:
    only the grid is checked, and whoever integrates the first frame checks the pixels then
    (:meth:`workers.feeder.Feeder.submit`, with :func:`check_model_geometry`)."""
    from pipeline.integration import LineOutIntegrator, NoPixelInRange

    try:
        integrator = LineOutIntegrator(settings.integration, settings.grid.grid())
    except NoPixelInRange as error:  # said with the q range the geometry does reach
        if error.integrator is not None:
            check_model_geometry(error.integrator, settings)
        raise
    check_model_geometry(integrator, settings)
    return integrator


def check_model_geometry(integrator: LineOutIntegrator, settings: ScanSettings) -> None:
    """:func:`check_geometry` of ``integrator`` against the instrument of the model of
    ``settings`` (read from its card)."""
    from pipeline.model import read_card
    from pipeline.model.checkpoint import card_instrument, model_name

    with _one_line():
        card = read_card(settings.inference.model)
    check_geometry(integrator, card_instrument(card), model_name(card))


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

    - the model file (card found, weights matching its SHA-256);
    - the PONI, mask, dark and flat files, and that they fit each other, the q grid and the
      model's instrument (:func:`checked_integrator`: the integrator is built once, and
      where the frames' shape is known its pixels per bin are compared);
    - the output folder writable;
    - the CURVE keys, when remote workers are accepted.
    """
    from pipeline.model import check_model_file
    from pipeline.transport.security import read_public_key, read_secret_key

    with _one_line():
        check_model_file(settings.inference.model)
        checked_integrator(settings)
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
