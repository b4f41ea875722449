"""What an operator sees in the Prefect UI: the run forms of the deployed scan flows (the few
fields they fill first, in plain words, then the expert settings), the tags of runs, and
whether ``serve`` is running (a run that nothing starts fails, saying why)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from flows.cli import main
from flows.online import SourceOptions, live_source, online_reconstruction
from flows.operator import BEAMLINE_VARIABLE, operator_settings, run_tags
from flows.reprocess import reprocess_scans
from pipeline.config import InferenceConfig, IntegrationConfig, ScanSettings
from pipeline.source_specs import DectrisStreamSource, WatchedFolder

#: Markup of Sphinx docstrings, which the UI's form would show as it is.
MARKUP = re.compile(r":(meth|class|func|mod|data|attr|exc):|``")

#: Each deployed scan flow and the fields its form lists first, in order.
OPERATOR_FIELDS = {
    online_reconstruction: ["scan_id", "source", "poni", "mask", "model", "output_dir"],
    reprocess_scans: ["scans", "poni", "mask", "model", "output_dir", "retry_failed"],
}


def _descriptions(node: object, where: str = "") -> list[tuple[str, str]]:
    """Every description in a JSON schema, with where it is."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                found.append((where, value))
            else:
                found += _descriptions(value, f"{where}/{key}")
    elif isinstance(node, list):
        for number, value in enumerate(node):
            found += _descriptions(value, f"{where}/{number}")
    return found


@pytest.mark.parametrize("flow", OPERATOR_FIELDS, ids=lambda flow: flow.name)
def test_run_form_lists_the_operator_fields_first_in_plain_words(flow):
    """The form (Prefect's parameter schema, what the UI draws) starts with the operator's
    fields, then ``expert``; every field and nested setting is described, without markup;
    the source is a text box (the older UI draws a union of objects as a raw JSON box)."""
    schema = flow.parameters.model_dump_for_openapi()
    properties = schema["properties"]
    order = sorted(properties, key=lambda name: properties[name]["position"])
    operator = OPERATOR_FIELDS[flow]
    assert order[: len(operator) + 1] == [*operator, "expert"]
    assert all(properties[name].get("description") for name in order), order
    settings = schema["definitions"]["ScanSettings"]["properties"]
    assert all(field.get("description") for field in settings.values())
    assert not [(where, text) for where, text in _descriptions(schema) if MARKUP.search(text)]
    assert "oneOf" not in str(schema)
    if flow is online_reconstruction:
        assert properties["source"]["type"] == "string" and schema["required"] == ["source"]


def test_operator_fields_win_over_the_expert_settings():
    expert = ScanSettings(
        output_dir=Path("/data/expert"),
        n_workers=1,
        integration=IntegrationConfig(poni=Path("expert.poni"), azimuth_range_deg=None),
        inference=InferenceConfig(model=Path("expert.safetensors"), n_samples=50),
    )
    assert operator_settings(expert) == expert
    assert operator_settings(None) == ScanSettings()
    settings = operator_settings(
        expert, poni=Path("op.poni"), mask=Path("op.npy"), model="default", output_dir=Path("/o")
    )
    assert settings.integration == IntegrationConfig(
        poni=Path("op.poni"), mask=Path("op.npy"), azimuth_range_deg=None
    )
    assert settings.inference == InferenceConfig(model=Path("default"), n_samples=50)
    assert (settings.output_dir, settings.n_workers) == (Path("/o"), 1)
    # filled in the form (as the UI sends it), the same
    parameters = online_reconstruction.validate_parameters(
        {"source": "/data/in", "poni": "op.poni", "expert": expert.model_dump(mode="json")}
    )
    assert parameters["expert"] == expert and parameters["poni"] == Path("op.poni")


def test_source_text_names_a_stream_or_a_folder_with_its_pattern():
    options = SourceOptions(protocol="dectris-v2", idle_timeout_s=5, hdf5_dataset="/m/data")
    assert live_source(" tcp://10.0.0.5:9999 ", options) == DectrisStreamSource(
        stream="tcp://10.0.0.5:9999", protocol="dectris-v2", idle_timeout_s=5
    )
    assert live_source("/data/in/frame_*.cbf", options) == WatchedFolder(
        directory=Path("/data/in"), pattern="frame_*.cbf", hdf5_dataset="/m/data", idle_timeout_s=5
    )
    watched = live_source("/data/in", SourceOptions(idle_timeout_s=None))
    assert (watched.directory, watched.pattern, watched.idle_timeout_s) == (
        Path("/data/in"),
        "*",
        None,
    )
    with pytest.raises(ValueError, match="idle timeout"):
        live_source("tcp://10.0.0.5:9999", SourceOptions(idle_timeout_s=None))
    with pytest.raises(ValueError):
        live_source("tcp://", options)  # no host


def test_run_tags_name_the_project_the_kind_and_the_beamline(monkeypatch):
    monkeypatch.delenv(BEAMLINE_VARIABLE, raising=False)
    assert run_tags("scan:online") == ["beamline-inn", "scan:online"]
    monkeypatch.setenv(BEAMLINE_VARIABLE, "ID13")
    assert run_tags("scan:demo") == ["beamline-inn", "scan:demo", "beamline:ID13"]
    assert run_tags("scan:demo", "BM26") == ["beamline-inn", "scan:demo", "beamline:BM26"]


@pytest.mark.slow  # a whole demo scan (6-21 s): the default suite stays under 15 min
def test_demo_run_carries_its_tags(prefect_harness, tmp_path, monkeypatch, capsys):
    """``beamline-inn demo``'s run is tagged with the project, the scan's kind and the
    beamline of ``BEAMLINE_INN_BEAMLINE``: the UI's run list filters by them."""
    monkeypatch.setenv(BEAMLINE_VARIABLE, "test-beamline")
    assert main(["demo", "--frames", "2", "--workers", "1", "--out", str(tmp_path)]) == 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["scan:demo"]))
        )
    (run,) = [run for run in runs if run.parameters.get("output_dir") == str(tmp_path)]
    assert {"beamline-inn", "scan:demo", "beamline:test-beamline"} <= set(run.tags)


def _api(url: str, body: object | None = None) -> dict | list:
    """One call to Prefect's REST API (POST with a body), retried while the server's SQLite
    is busy (503)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers={"Content-Type": "application/json"})
    for delay_s in (1, 2, 4, 8, 0):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 503 or not delay_s:
                raise
            time.sleep(delay_s)


def _wait_for(what: str, check, timeout_s: float) -> object:
    """``check()``'s first true value, tried every second for ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.mark.slow
def test_ui_shows_whether_serve_runs_and_a_run_nothing_starts_fails_saying_why(
    tmp_path, monkeypatch
):
    """Against ``prefect server start``: while ``beamline-inn serve`` runs, its deployment is
    Ready; once it stopped, Not ready (Prefect's foreman, here after 15 s instead of 60); a run
    started then goes Late and, 10 s later, Failed with a message that names serve, and it
    carries the deployment's tags."""
    from conftest import free_port, start_prefect_server

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS", "2")
    monkeypatch.setenv(
        "PREFECT_SERVER_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS", "15"
    )
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS", "5")
    server, env = start_prefect_server(tmp_path / "prefect", free_port())
    api = env["PREFECT_API_URL"]
    try:
        deployments = tmp_path / "deployments.yaml"
        deployments.write_text(
            "beamline: test-beamline\n"
            "demo:\n  name: demo-test\n"
            f"  parameters: {{n_frames: 2, output_dir: {tmp_path / 'out'}}}\n"
        )
        command = [sys.executable, "-m", "flows.cli", "serve", str(deployments)]
        serve = subprocess.Popen(
            [*command, "--fail-unserved-after", "10"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def ready() -> list[dict]:
            if serve.poll() is not None:
                raise AssertionError(f"serve ended: {serve.communicate()[0][-2000:]}")
            return [d for d in _api(f"{api}/deployments/filter", {}) if d["status"] == "READY"]

        try:
            (deployment,) = _wait_for("the deployment Ready", ready, 180)
            name = "beamline-inn: unserved runs of reconstruct-scan/demo-test"
            (automation,) = [a for a in _api(f"{api}/automations/filter", {}) if a["name"] == name]
            assert automation["enabled"] and automation["trigger"]["within"] == 10
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            printed = serve.communicate(timeout=60)[0]
        assert "serving reconstruct-scan/demo-test" in printed, printed[-2000:]
        url = f"{api}/deployments/{deployment['id']}"
        _wait_for("Not ready", lambda: _api(url)["status"] == "NOT_READY", 60)
        run = _api(f"{url}/create_flow_run", {})
        assert {"beamline-inn", "scan:demo", "beamline:test-beamline"} <= set(run["tags"])
        state = _wait_for(
            "the unserved run Failed",
            lambda: (s := _api(f"{api}/flow_runs/{run['id']}")["state"])["type"] == "FAILED" and s,
            120,
        )
        assert state["name"] == "Unserved"
        assert "no beamline-inn serve serves reconstruct-scan/demo-test" in state["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
