"""The posterior model (cINN), its training and its model files.

The public entry point is :func:`load`, which returns a :class:`PosteriorModel` with
``parameter_names`` and ``sample(counts, n_samples)``.
"""

from pipeline.model.checkpoint import (
    DEFAULT_MODEL,
    ModelFileError,
    check_model_file,
    load,
    read_card,
    save,
)
from pipeline.model.posterior import Architecture, PosteriorModel

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
