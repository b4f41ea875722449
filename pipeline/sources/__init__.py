"""Where exposures come from. Each source is an iterable of :class:`pipeline.exposure.Exposure`."""

from pipeline.sources.simulated import SimulatedDetector

__all__ = ["SimulatedDetector"]
