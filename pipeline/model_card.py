"""Model cards read without torch: the JSON beside a model's weights (``NAME.json``).

:mod:`pipeline.model.checkpoint` reads cards too, but importing it imports torch; a process
that only stores a card (the results writer) reads it here. ``tests/test_bundled.py`` checks
that both read every bundled card, and a legacy one, alike.

Example:
    >>> card = read_card("pilatus1m-5m-sector")
    >>> card["weights_file"], card_instrument(card).name
    ('pilatus1m-5m-sector.safetensors', 'pilatus1m-5m-sector')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.bundled import BUNDLED_MODELS, DEFAULT_MODEL
from pipeline.instrument import Instrument, PriorRanges, default_instrument

#: What a model card says it is (its ``format`` and ``format_version``).
FORMAT = "beamline-inn-cinn"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, inconsistent or does not match its card."""


def card_path(weights: Path) -> Path:
    """The JSON model card that belongs to a weights file."""
    return Path(weights).with_suffix(".json")


def resolve_model(model: Path | str | None = None) -> Path:
    """The weights file of ``model``: a file, the name of a bundled model, or ``None`` for
    the default.

    >>> resolve_model("pilatus1m-5m-sector").name
    'pilatus1m-5m-sector.safetensors'
    """
    if model is None:
        return DEFAULT_MODEL
    if str(model) in BUNDLED_MODELS and not Path(model).exists():
        return BUNDLED_MODELS[str(model)]
    return Path(model)


def read_card(path: Path | str | None = None) -> dict[str, Any]:
    """The model card of ``path`` (a file or a bundled model's name; the default model when
    ``None``), without loading weights; :class:`ModelFileError` when it is missing or of
    another format."""
    weights = resolve_model(path)
    card_file = card_path(weights)
    if not card_file.is_file() and not weights.exists():  # neither a model nor a name of one
        raise ModelFileError(
            f"model file not found: {weights} (bundled models: {', '.join(BUNDLED_MODELS)})"
        )
    if not card_file.is_file():
        raise ModelFileError(
            f"model card not found: {card_file} (a model is a .safetensors file with its card, "
            "a .json of the same name, beside it)"
        )
    card = json.loads(card_file.read_text())
    if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{card_file} is not a {FORMAT} v{FORMAT_VERSION} model card")
    return card


def card_instrument(card: dict[str, Any]) -> Instrument:
    """The instrument a model card describes (cards from before instruments: the default
    instrument where grid and prior are the default's, else one with uniform background
    weights and unknown pixel counts)."""
    if "instrument" in card:
        return Instrument.model_validate(card["instrument"])
    default = default_instrument()
    grid = card["physics"]["grid"]
    prior = {k: tuple(v) for k, v in card["prior"].items() if isinstance(v, list)}
    if default.prior == PriorRanges(**prior) and all(
        getattr(default, key) == value for key, value in grid.items()
    ):
        return default
    return Instrument(
        name="legacy",
        description="a model card from before instruments",
        **grid,
        azimuth_range_deg=None,
        pixels_per_bin=(0,) * grid["n_points"],
        background_weights=(1.0,) * grid["n_points"],
        prior=PriorRanges(**prior),
    )
