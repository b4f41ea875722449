"""Validation as one job: a model's calibration on simulations and its distance to the
exact posterior (:mod:`pipeline.model.validation`), written as ``validation.json`` and PNG
figures, optionally into the model card, and reported.

:func:`run_validation` is what ``beamline-inn validate`` and the ``validate-model`` flow
both call; its :class:`ValidationReport` renders itself as the command's text and as the
flow's markdown artifact. The exact posteriors take about 10 s per exposure: a validation
takes minutes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.instrument import load_instrument
from pipeline.model.checkpoint import load, model_for_instrument
from pipeline.model.validation import reference_diagnostics, simulation_diagnostics, write_figures
from pipeline.model_card import card_path, resolve_model
from pipeline.physics import GRATING_PARAMETERS


@dataclass(frozen=True)
class ValidationReport:
    """What a validation measured and where it wrote it."""

    #: the model's weights file
    model: Path
    #: the model's instrument, in one line (:meth:`Instrument.describe`)
    instrument: str
    #: ``validation.json``: the diagnostics below
    report_path: Path
    #: the PNG figures by name: ``coverage``, ``sbc``, ``corner_0``, ...
    figures: Mapping[str, Path]
    #: ``simulation`` (:func:`simulation_diagnostics`) and ``reference``
    #: (:func:`reference_diagnostics`): JSON-able reports
    diagnostics: Mapping[str, Mapping[str, Any]]
    #: the model card the diagnostics were stored in, if they were
    updated_card: Path | None = None

    @property
    def simulation(self) -> Mapping[str, Any]:
        """Calibration on simulations from the prior (SBC, coverage, ...)."""
        return self.diagnostics["simulation"]

    @property
    def reference(self) -> Mapping[str, Any]:
        """Distance to the exact posterior (sd ratios, bias, mode weights, C2ST)."""
        return self.diagnostics["reference"]

    def _measures(self) -> dict[str, Mapping[str, float]]:
        """The measures per parameter, by their label in the markdown table."""
        return {
            "calibration error": self.simulation["calibration_error"],
            "SBC KS p-value": self.simulation["sbc_ks_p"],
            "sd / exact sd (median)": self.reference["sd_ratio_median"],
            "abs(bias) / exact sd (median)": self.reference["bias_in_exact_sd_median"],
        }

    def text(self) -> str:
        """The outcome in a few lines, as ``beamline-inn validate`` prints it."""
        simulation, reference = self.simulation, self.reference

        def row(label: str, values: Mapping[str, float], form: str) -> str:
            return label + "  ".join(f"{n} {values[n]:{form}}" for n in GRATING_PARAMETERS)

        lines = [
            f"report: {self.report_path}; figures: {', '.join(map(str, self.figures.values()))}",
            row("calibration error:  ", simulation["calibration_error"], ".3f"),
            row("SBC KS p:           ", simulation["sbc_ks_p"], ".3g"),
            row("sd ratio (median):  ", reference["sd_ratio_median"], ".2f"),
            row("|bias| / exact sd:  ", reference["bias_in_exact_sd_median"], ".2f"),
            f"mode weight error:  max {reference['mode_weight_error_max']}, "
            f"C2ST median {reference['c2st_median']:.3f}",
        ]
        if self.updated_card is not None:
            lines.append(f"diagnostics written into {self.updated_card}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The outcome as a markdown page: a table of the measures per parameter."""
        reference = self.reference
        return "\n".join(
            [
                f"# Validation of `{self.model}`",
                "",
                f"{self.simulation['n_exposures']} simulated exposures, "
                f"{reference['n_exposures']} against the exact posterior; "
                f"report `{self.report_path}`.",
                "",
                "| | " + " | ".join(GRATING_PARAMETERS) + " |",
                "|---|---|---|---|",
                *(
                    f"| {label} | "
                    + " | ".join(f"{values[n]:.3g}" for n in GRATING_PARAMETERS)
                    + " |"
                    for label, values in self._measures().items()
                ),
                "",
                f"Width mode weight error (max): {reference['mode_weight_error_max']}; "
                f"C2ST (median): {reference['c2st_median']:.3f} (0.5: indistinguishable from "
                "exact).",
            ]
        )


def run_validation(
    model: Path | str | None = None,
    out: Path = Path("validation"),
    *,
    instrument: Path | None = None,
    simulations: int = 200,
    reference: int = 20,
    seed: int = 2024,
    reference_cache: Path | None = None,
    update_card: bool = False,
    on_reference: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Validate ``model`` (a file or a bundled model's name; default: the default model, or
    with ``instrument`` the bundled model for it, else ``NAME.safetensors`` here) on the
    CPU: calibration on ``simulations`` exposures (seed ``seed``) and the distance to the
    exact posterior on ``reference`` exposures (seed ``seed + 1``; about 10 s each, kept in
    and reused from ``reference_cache`` if given), written into the folder ``out``.

    With ``instrument`` (an instrument file) the model must have been trained for it
    (:class:`~pipeline.model.checkpoint.ModelFileError` otherwise). ``update_card`` stores
    the diagnostics in the model card. ``on_reference(done, total)`` after each exact
    posterior; ``log(line)`` gets what the validation does as it goes.
    """
    if instrument is not None:
        path = model_for_instrument(load_instrument(instrument), model)
    else:
        path = resolve_model(model)
    posterior = load(path, device="cpu")
    say = log or (lambda line: None)
    say(f"validating {path} for {posterior.instrument.describe()}")
    say(f"on {simulations} simulated exposures ...")
    simulation, simulation_arrays = simulation_diagnostics(posterior, simulations, seed=seed)
    say(f"... and against the exact posterior on {reference} exposures (about 10 s each)")

    def done(count: int, total: int) -> None:
        say(f"    reference {count}/{total}")
        if on_reference is not None:
            on_reference(count, total)

    exact, exact_arrays = reference_diagnostics(
        posterior, reference, seed=seed + 1, progress=done, cache_dir=reference_cache
    )
    diagnostics = {"simulation": simulation, "reference": exact}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(diagnostics, indent=2) + "\n")
    figures = write_figures(simulation_arrays, exact_arrays, out)
    return ValidationReport(
        model=path,
        instrument=posterior.instrument.describe(),
        report_path=out / "validation.json",
        figures={Path(figure).stem: Path(figure) for figure in figures},
        diagnostics=diagnostics,
        updated_card=_store_in_card(path, diagnostics) if update_card else None,
    )


def _store_in_card(weights: Path, diagnostics: dict[str, Any]) -> Path:
    """Replace the diagnostics in the model card of ``weights``; the card's path."""
    card_file = card_path(weights)
    card = json.loads(card_file.read_text())
    card["diagnostics"] = diagnostics
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    return card_file
