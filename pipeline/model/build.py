"""The model class that an :class:`~pipeline.model.posterior.Architecture` describes."""

from __future__ import annotations

from pipeline.instrument import Instrument
from pipeline.model.bidirectional import BidirectionalINN
from pipeline.model.posterior import Architecture, PosteriorModel

#: Objectives :func:`build_model` knows, as in ``Architecture.objective``.
OBJECTIVES = ("maximum-likelihood", "bidirectional")


def build_model(
    architecture: Architecture, instrument: Instrument | None = None
) -> PosteriorModel | BidirectionalINN:
    """A freshly initialised model of ``architecture.objective`` for ``instrument`` (the
    default one when ``None``)."""
    if architecture.objective == "maximum-likelihood":
        return PosteriorModel(architecture, instrument)
    if architecture.objective == "bidirectional":
        return BidirectionalINN(architecture, instrument)
    raise ValueError(f"unknown objective {architecture.objective!r}: one of {OBJECTIVES}")
