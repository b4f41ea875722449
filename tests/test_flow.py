"""``beamline-inn demo`` end to end: Prefect flow, 2 worker processes, one HDF5 file."""

import os

import numpy as np
import pytest

from flows.cli import main
from pipeline.store import read_results


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_demo_writes_every_exposure_exactly_once(prefect_harness, tmp_path, capsys):
    assert main(["demo", "--frames", "24", "--workers", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "exposures:  24 (24 written, 0 failed)" in printed
    (path,) = tmp_path.glob("*.h5")
    assert str(path) in printed
    results = read_results(path)
    assert results.index.tolist() == list(range(24))
    assert (results.status == "ok").all()
    assert results.samples.shape == (24, 1000, 5) and np.isfinite(results.samples).all()
    assert results.parameter_names[:3] == ("pitch_nm", "width_nm", "sigma_nm")
    assert results.model_card["weights_sha256"]
