"""The ``instrument`` command: an instrument file derived from a detector's geometry."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands.arguments import Commands, positive_int


def add_instrument(commands: Commands) -> None:
    """``instrument``: an instrument file from a PONI, mask and sector."""
    instrument = commands.add_parser(
        "instrument",
        help="derive an instrument file (q grid, masked bins, pixels and background weight "
        "per bin) from a PONI geometry, for beamline-inn train --instrument",
        description="Count with pyFAI, as the pipeline integrates, the unmasked pixels of each "
        "q bin in the sector or ring: bins without a pixel (module gaps, the mask) are masked, "
        "the background weights are the pixels per bin over their mean. A q range the "
        "geometry does not reach, or more than half of the bins masked, is refused.",
    )
    instrument.add_argument("--poni", type=Path, required=True, help="the PONI file")
    instrument.add_argument(
        "--mask", type=Path, help="mask image (non-zero = masked), besides the detector's gaps"
    )
    region = instrument.add_mutually_exclusive_group()
    region.add_argument(
        "--sector",
        type=float,
        nargs=2,
        default=(-5.0, 5.0),
        metavar=("LOW", "HIGH"),
        help="azimuthal sector in pyFAI's chi, degrees (default -5 5)",
    )
    region.add_argument("--full-ring", action="store_true", help="the full ring, no sector")
    instrument.add_argument(
        "--q-range",
        type=float,
        nargs=2,
        required=True,
        metavar=("QMIN", "QMAX"),
        help="centres of the first and last q bin, 1/nm",
    )
    instrument.add_argument("--bins", type=positive_int, required=True, help="q bins (>= 8)")
    instrument.add_argument(
        "--resolution",
        type=float,
        metavar="DQ",
        help="Gaussian sd of the resolution, 1/nm (default: estimated from the pixel size, "
        "distance and wavelength: a lower bound)",
    )
    instrument.add_argument(
        "--prior",
        type=Path,
        metavar="FILE",
        help="JSON of prior ranges (pitch_nm, duty, sigma_nm, log10_n_photons, background: "
        "[low, high] each; any subset, the others default)",
    )
    instrument.add_argument(
        "--name",
        help="the instrument's name (default: the output file's name less .json, .instrument)",
    )
    instrument.add_argument(
        "--out", type=Path, required=True, metavar="FILE.json", help="instrument file to write"
    )
    instrument.set_defaults(run=_instrument)


def _instrument(args: argparse.Namespace) -> int:
    from pipeline.integration.instrument import derive_instrument, read_prior

    derived = derive_instrument(
        args.poni,
        (args.q_range[0], args.q_range[1]),
        args.bins,
        None if args.full_ring else (args.sector[0], args.sector[1]),
        mask=args.mask,
        resolution_nm=args.resolution,
        prior=read_prior(args.prior) if args.prior else None,
        name=args.name or args.out.stem.removesuffix(".instrument"),
    )
    print(derived.summary(set_resolution="give --resolution to set it"))
    path = derived.instrument.save(args.out)
    print(f"written: {path}")
    print(f"next: beamline-inn train --instrument {path}")
    return 0
