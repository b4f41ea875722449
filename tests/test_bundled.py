"""The light modules the results writer reads the package's files with (pipeline/bundled.py,
pipeline/model_card.py): the writer imports neither pyFAI nor torch, and a model card is read
and refused the same through pipeline.model, which uses them."""

import json
import subprocess
import sys

import pytest

from pipeline import model_card
from pipeline.bundled import BUNDLED_MODELS, DEFAULT_MODEL, DEFAULT_PONI
from pipeline.model import ModelFileError, check_model_file


def test_the_bundled_files_are_there():
    assert DEFAULT_PONI.is_file()
    for weights in BUNDLED_MODELS.values():
        assert weights.is_file() and model_card.card_path(weights).is_file()


@pytest.mark.parametrize("model", [None, *BUNDLED_MODELS])
def test_a_card_read_without_torch_is_the_checked_models(model):
    card = model_card.read_card(model)
    assert card == check_model_file(model)
    assert model_card.card_instrument(card).name == card["instrument"]["name"]


@pytest.mark.parametrize(
    ("prior_change", "name"), [({}, "default"), ({"pitch_nm": [150.0, 300.0]}, "legacy")]
)
def test_a_card_from_before_instruments_gives_the_default_or_a_legacy_instrument(
    prior_change, name
):
    card = json.loads(model_card.card_path(DEFAULT_MODEL).read_text())
    card.pop("instrument")
    card["prior"] = {**card["prior"], **prior_change}
    instrument = model_card.card_instrument(card)
    assert instrument.name == name
    assert (instrument.pixels_per_bin[0] == 0) == (name == "legacy")


def test_missing_and_foreign_cards_are_refused_with_the_reason(tmp_path):
    weights = tmp_path / "model.safetensors"
    with pytest.raises(ModelFileError, match="model file not found"):
        model_card.read_card(tmp_path / "absent.safetensors")
    weights.write_bytes(b"")
    with pytest.raises(ModelFileError, match="model card not found"):
        model_card.read_card(weights)
    (tmp_path / "model.json").write_text('{"format": "other"}')
    with pytest.raises(ModelFileError, match="is not a beamline-inn-cinn v1 model"):
        model_card.read_card(weights)


def test_the_results_writer_imports_neither_pyfai_nor_torch():
    code = (
        "import sys, workers.writer, pipeline.store.results; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyFAI', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
