"""The posterior model (cINN), its training and its model files.

The public entry point is :func:`load`, which returns a :class:`PosteriorModel` with
``parameter_names`` and ``sample(counts, n_samples)``.
"""

from pipeline.bundled import DEFAULT_MODEL
from pipeline.model.checkpoint import check_model_file, load, save
from pipeline.model.posterior import Architecture, PosteriorModel
from pipeline.model_card import ModelFileError, read_card

__all__ = [
    "DEFAULT_MODEL",
    "Architecture",
    "ModelFileError",
    "PosteriorModel",
    "check_model_file",
    "load",
    "read_card",
    "save",
]
