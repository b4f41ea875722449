"""Model files: weights as safetensors (plain tensors, no pickle) beside a JSON model card.

``NAME.safetensors`` holds the weights; ``NAME.json`` the card: architecture, physics model,
prior, q grid, training budget, measured diagnostics and the SHA-256 of the weights file.
:func:`load` refuses a weights file whose hash differs from its card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.model.bidirectional import BidirectionalINN
from pipeline.model.build import build_model
from pipeline.model.posterior import Architecture, PosteriorModel
from pipeline.physics import GratingPrior, QGrid

FORMAT = "beamline-inn-cinn"
FORMAT_VERSION = 1
#: The model shipped in the package, trained by ``beamline-inn train``.
DEFAULT_MODEL = Path(str(files("pipeline") / "data" / "grating-cinn.safetensors"))


#: Architecture fields added after the first model files, at the values those files were
#: trained with (a card without them describes that design).
LEGACY_ARCHITECTURE = {
    "activation": "silu",
    "conditional_affine": False,
    "centred_nuisances": False,
}


class ModelFileError(ValueError):
    """A model file that is missing, inconsistent or does not match its card."""


def card_path(weights: Path) -> Path:
    """The JSON model card that belongs to a weights file."""
    return Path(weights).with_suffix(".json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(model: PosteriorModel | BidirectionalINN, path: Path, **card: Any) -> Path:
    """Write ``path`` (.safetensors) and its card; extra keyword arguments go into the card."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(tensors, str(path), metadata={"format": FORMAT})
    model.card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.architecture_dict(),
        "physics": {"model": "grating-peaks", "grid": dataclasses.asdict(model.grid)},
        "prior": dataclasses.asdict(model.prior),
        "parameter_names": list(model.parameter_names),
        "parameter_units": list(model.parameter_units),
        "n_weights": sum(p.numel() for p in model.parameters()),
        **card,
        "weights_file": path.name,
        "weights_sha256": sha256(path),
    }
    card_path(path).write_text(json.dumps(model.card, indent=2) + "\n")
    return path


def read_card(path: Path | None = None) -> dict[str, Any]:
    """The model card of ``path`` (the shipped model when ``None``), without loading weights."""
    weights = Path(path) if path is not None else DEFAULT_MODEL
    card_file = card_path(weights)
    if not card_file.is_file():
        raise ModelFileError(
            f"model card not found: {card_file} (a model is a .safetensors file with its card, "
            "a .json of the same name, beside it)"
        )
    card = json.loads(card_file.read_text())
    if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{card_file} is not a {FORMAT} v{FORMAT_VERSION} model card")
    return card


def check_model_file(path: Path | None = None) -> dict[str, Any]:
    """The card of the model file ``path`` (the shipped one when ``None``) once its card and
    weights are found and the weights match the card's SHA-256; :class:`ModelFileError`
    saying which is not so. Nothing is loaded.

    >>> check_model_file()["weights_file"]
    'grating-cinn.safetensors'
    """
    weights = Path(path) if path is not None else DEFAULT_MODEL
    if not weights.exists():
        raise ModelFileError(f"model file not found: {weights}")
    if not weights.is_file():
        raise ModelFileError(f"model file {weights} is not a file")
    card = read_card(weights)
    if sha256(weights) != card["weights_sha256"]:
        raise ModelFileError(
            f"{weights} does not match the SHA-256 in its model card: refusing to load"
        )
    return card


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(path: Path | None = None, device: str = "auto") -> PosteriorModel | BidirectionalINN:
    """Load a model file (the shipped one when ``None``) for inference.

    The weights' SHA-256 must match the card; no pickled code is ever executed.

    Example:
        >>> model = load()
        >>> model.parameter_names[:3]
        ('pitch_nm', 'width_nm', 'sigma_nm')
    """
    weights = Path(path) if path is not None else DEFAULT_MODEL
    card = check_model_file(weights)
    model = build_model(
        Architecture(**{**LEGACY_ARCHITECTURE, **card["architecture"]}),
        GratingPrior(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in card["prior"].items()}
        ),
        QGrid(**card["physics"]["grid"]),
    )
    try:
        state = load_file(str(weights))
    except SafetensorError as error:  # not safetensors (a pickled checkpoint, say): not read
        raise ModelFileError(f"{weights} is not a safetensors file: {error}") from error
    model.load_state_dict(state, strict=True)
    model.card = card
    return model.to(resolve_device(device)).eval()
