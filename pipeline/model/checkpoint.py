"""Model files: weights as safetensors (plain tensors, no pickle) beside a JSON model card.

``NAME.safetensors`` holds the weights; ``NAME.json`` the card: the instrument (and its
SHA-256), architecture, physics model, prior, q grid, training budget, measured diagnostics
and the SHA-256 of the weights file. :func:`load` refuses a weights file whose hash differs
from its card.

Models are named by a file or by the name of a bundled model
(:data:`pipeline.bundled.BUNDLED_MODELS`): ``default`` (DESIGN.md's instrument) and
``pilatus1m-5m-sector``. The instrument of each bundled model is also written beside it as
``NAME.instrument.json``. Cards are read by :mod:`pipeline.model_card` (without torch), whose
functions this module uses and re-exports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.bundled import BUNDLED_MODELS
from pipeline.instrument import Instrument
from pipeline.model.bidirectional import BidirectionalINN
from pipeline.model.build import build_model
from pipeline.model.posterior import Architecture, PosteriorModel
from pipeline.model_card import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    card_instrument,
    card_path,
    read_card,
    resolve_model,
)

#: Architecture fields added after the first model files, at the values those files were
#: trained with (a card without them describes that design).
LEGACY_ARCHITECTURE = {
    "activation": "silu",
    "conditional_affine": False,
    "centred_nuisances": False,
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_for_instrument(instrument: Instrument, model: Path | str | None = None) -> Path:
    """The weights file of ``model`` (default: the bundled model for ``instrument``, else
    ``NAME.safetensors`` in the working folder, as ``beamline-inn train --instrument``
    writes it), once its card says it was trained for ``instrument``; :class:`ModelFileError`
    otherwise.

    >>> from pipeline.instrument import default_instrument
    >>> model_for_instrument(default_instrument()).name
    'grating-cinn.safetensors'
    """
    if model is None:
        bundled = [
            path
            for path in BUNDLED_MODELS.values()
            if card_path(path).is_file()
            and card_instrument(json.loads(card_path(path).read_text())) == instrument
        ]
        path = bundled[0] if bundled else Path(f"{instrument.name}.safetensors")
    else:
        path = resolve_model(model)
    trained_for = card_instrument(read_card(path))
    if trained_for.sha256() != instrument.sha256():
        raise ModelFileError(
            f"the model {path} was trained for the instrument {trained_for.name!r} "
            f"(SHA-256 {trained_for.sha256()[:12]}), not for {instrument.name!r} "
            f"({instrument.sha256()[:12]})"
        )
    return path


def model_name(card: dict[str, Any]) -> str:
    """The name a model goes by in messages: its card's ``name``, else its instrument's."""
    return str(card.get("name") or card_instrument(card).name)


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
        "instrument": model.instrument.model_dump(mode="json"),
        "instrument_sha256": model.instrument.sha256(),
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


def check_model_file(path: Path | str | None = None) -> dict[str, Any]:
    """The card of the model file ``path`` (a file or a bundled model's name; the default
    model when ``None``) once its card and weights are found and the weights match the
    card's SHA-256; :class:`ModelFileError` saying which is not so. Nothing is loaded.

    >>> check_model_file()["weights_file"]
    'grating-cinn.safetensors'
    """
    weights = resolve_model(path)
    if not weights.exists():
        raise ModelFileError(
            f"model file not found: {weights} (bundled models: {', '.join(BUNDLED_MODELS)})"
        )
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


def load(path: Path | str | None = None, device: str = "auto") -> PosteriorModel | BidirectionalINN:
    """Load a model for inference: a file, a bundled model's name
    (:data:`pipeline.bundled.BUNDLED_MODELS`),
    or the default model when ``None``.

    The weights' SHA-256 must match the card; no pickled code is ever executed.

    Example:
        >>> model = load()
        >>> model.parameter_names[:3], model.instrument.name
        (('pitch_nm', 'width_nm', 'sigma_nm'), 'default')
    """
    weights = resolve_model(path)
    card = check_model_file(weights)
    model = build_model(
        Architecture(**{**LEGACY_ARCHITECTURE, **card["architecture"]}), card_instrument(card)
    )
    try:
        state = load_file(str(weights))
    except SafetensorError as error:  # not safetensors (a pickled checkpoint, say): not read
        raise ModelFileError(f"{weights} is not a safetensors file: {error}") from error
    model.load_state_dict(state, strict=True)
    model.card = card
    return model.to(resolve_device(device)).eval()
