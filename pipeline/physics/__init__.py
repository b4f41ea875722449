"""Forward models, priors and simulators (see :mod:`pipeline.physics.grating`)."""

from pipeline.physics.grating import (
    GRATING_PARAMETERS,
    PARAMETER_NAMES,
    PARAMETER_UNITS,
    GratingPrior,
    QGrid,
    expected_counts,
    simulate,
)

__all__ = [
    "GRATING_PARAMETERS",
    "PARAMETER_NAMES",
    "PARAMETER_UNITS",
    "GratingPrior",
    "QGrid",
    "expected_counts",
    "simulate",
]
