"""The model class that an :class:`~pipeline.model.posterior.Architecture` describes."""

from __future__ import annotations

from pipeline.model.bidirectional import BidirectionalINN
from pipeline.model.posterior import Architecture, PosteriorModel
from pipeline.physics import GratingPrior, QGrid

#: Objectives :func:`build_model` knows, as in ``Architecture.objective``.
OBJECTIVES = ("maximum-likelihood", "bidirectional")


def build_model(
    architecture: Architecture, prior: GratingPrior = GratingPrior(), grid: QGrid = QGrid()
) -> PosteriorModel | BidirectionalINN:
    """A freshly initialised model of ``architecture.objective``."""
    if architecture.objective == "maximum-likelihood":
        return PosteriorModel(architecture, prior, grid)
    if architecture.objective == "bidirectional":
        return BidirectionalINN(architecture, prior, grid)
    raise ValueError(f"unknown objective {architecture.objective!r}: one of {OBJECTIVES}")
