"""What several commands share: option types, the scan commands' options and their
configuration.

Only the standard library is imported here: the pipeline's modules load when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

#: What ``build_parser`` hands each command's ``add_*`` function to add its parser to.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def positive_int(text: str) -> int:
    """An option's whole number of at least 1; argparse says what is wrong otherwise.

    >>> positive_int("3")
    3
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An option's whole number of at least 0; argparse says what is wrong otherwise.

    >>> non_negative_int("0")
    0
    """
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def model_help() -> str:
    """The help of a scan command's ``--model`` (and ``demo``'s)."""
    from pipeline.bundled import BUNDLED_MODELS

    return (
        f"model file or bundled model's name ({', '.join(BUNDLED_MODELS)}); without it, the "
        "default model. The line-outs are on its instrument's q grid, and a geometry (PONI, "
        "mask, sector) that does not match its instrument is refused before the scan starts"
    )


def add_hdf5_dataset_option(command: argparse.ArgumentParser, when: str = "") -> None:
    """``--hdf5-dataset``, its help starting with ``when``."""
    command.add_argument(
        "--hdf5-dataset",
        metavar="PATH",
        help=f"{when}the frames' dataset in HDF5 files (3-D: one exposure per frame) where it "
        "is not an Eiger place (/entry/data/data, /entry/data/data_NNNNNN) or a NeXus "
        "detector's data",
    )


def add_scan_options(command: argparse.ArgumentParser, scan_id: bool = True) -> None:
    """Options shared by ``reprocess`` and ``online``: geometry, corrections, output."""
    command.add_argument("--poni", type=Path, required=True, help="pyFAI geometry (PONI v1/v2)")
    command.add_argument("--mask", type=Path, help="mask image (EDF, TIFF, .npy; non-zero masked)")
    command.add_argument("--dark", type=Path, help="dark-current image subtracted from each frame")
    command.add_argument("--flat", type=Path, help="flat-field image (relative efficiency)")
    sector = command.add_mutually_exclusive_group()
    sector.add_argument(
        "--sector",
        type=float,
        nargs=2,
        metavar=("A", "B"),
        default=(-5.0, 5.0),
        help="azimuthal sector in pyFAI's chi, degrees (default -5 5)",
    )
    sector.add_argument("--full-ring", action="store_true", help="integrate the full ring")
    command.add_argument(
        "--normalize-by",
        action="append",
        default=[],
        metavar="KEY",
        help="frame metadata (e.g. monitor, transmission) to normalise by; repeatable",
    )
    command.add_argument("--out", type=Path, required=True, help="output folder")
    if scan_id:
        command.add_argument("--scan-id", help="name of the scan and its results file")
    command.add_argument(
        "--workers",
        type=non_negative_int,
        default=2,
        help="local inference workers (default 2; 0 with --remote-work: remote workers only)",
    )
    command.add_argument(
        "--integrators",
        type=positive_int,
        metavar="N",
        help="pyFAI engines integrating frames at once: 1 in the feeder, more in processes of "
        "their own, for a full ring or the lut and histogram methods (default: 1 for csr, "
        "else the cores beside the local workers, at most 8)",
    )
    command.add_argument(
        "--integrate-on-workers",
        action="store_true",
        help="the GPU mode: the inference workers integrate the frames on their own device (a "
        "batch of frames goes to the GPU once, the line-outs straight to the model there); the "
        "csr method, a detector shape known before the first frame (a PONI that names the "
        "detector, or frame files whose headers give it), local workers only",
    )
    command.add_argument(
        "--remote-work",
        metavar="URL",
        help="also take inference workers from other nodes (beamline-inn worker --connect) on "
        "this tcp:// address, e.g. tcp://*:5555",
    )
    command.add_argument(
        "--curve-key", type=Path, metavar="FILE", help="this feeder's .key_secret (CURVE)"
    )
    command.add_argument(
        "--authorized-keys",
        type=Path,
        metavar="DIR",
        help="folder of the public .key files of the workers allowed to connect (CURVE)",
    )
    command.add_argument(
        "--samples", type=positive_int, default=1000, help="posterior samples per exposure"
    )
    command.add_argument(
        "--stored-samples",
        type=non_negative_int,
        metavar="K",
        help="posterior draws stored per exposure (default: every one of --samples): the first "
        "K; 0 stores the summaries alone (mean, sd, quantiles, width modes, predictive check, "
        "still computed from every draw): a smaller file for high-rate scans",
    )
    command.add_argument("--model", type=Path, metavar="NAME|FILE", help=model_help())
    command.add_argument(
        "--compile",
        action="store_true",
        help="workers compile their sampler with torch.compile when they start (on a CPU 11 s "
        "to 2 minutes each), then draw about twice as fast: for the lowest latency online",
    )
    command.add_argument(
        "--samples-compression",
        choices=("none", "gzip", "bitshuffle-lz4"),
        default="none",
        help="compression of the posterior samples in the results file: none (default; any "
        "HDF5 reader), gzip (smaller, the writer slower) or bitshuffle-lz4 (readers need the "
        "bitshuffle plugin, e.g. `import hdf5plugin`)",
    )
    command.add_argument(
        "--sasdata-groups",
        choices=("every", "first"),
        default="every",
        help="NXcanSAS SASdata groups added when the scan ends: every exposure's (default; "
        "SasView reads each curve, about 0.3 ms per exposure) or only the first one's "
        "(high-rate scans: the file is complete at once; line_out/I holds every line-out)",
    )


def scan_config(args: argparse.Namespace, scan_id: str) -> PipelineConfig:
    """The :class:`PipelineConfig` of a ``reprocess``, ``reprocess-scans`` or ``online``
    command, on its model's q grid (:func:`pipeline.preflight.settings_for_model`); its
    settings (geometry, mask, dark, flat, model, the geometry against the model's instrument,
    output folder, CURVE keys) are checked here, before Prefect and the workers start
    (:func:`pipeline.preflight.check_settings`)."""
    from pipeline.config import (
        InferenceConfig,
        IntegrationConfig,
        PipelineConfig,
        StoreConfig,
        TransportConfig,
    )
    from pipeline.preflight import check_settings, settings_for_model

    config = PipelineConfig(
        scan_id=getattr(args, "scan_id", None) or scan_id,
        output_dir=args.out,
        n_workers=args.workers,
        n_integrators=args.integrators,
        integrate_on_workers=args.integrate_on_workers,
        integration=IntegrationConfig(
            poni=args.poni,
            mask=args.mask,
            dark=args.dark,
            flat=args.flat,
            azimuth_range_deg=None if args.full_ring else tuple(args.sector),
            normalization_keys=tuple(args.normalize_by),
        ),
        inference=InferenceConfig(n_samples=args.samples, model=args.model, compile=args.compile),
        store=StoreConfig(
            samples_compression=args.samples_compression,
            sasdata_groups=args.sasdata_groups,
            stored_samples=args.stored_samples,
        ),
        transport=TransportConfig(
            remote_work=args.remote_work,
            curve_secret_key=args.curve_key,
            curve_authorized_keys=args.authorized_keys,
        ),
    )
    config = settings_for_model(config)
    check_settings(config)
    return config
