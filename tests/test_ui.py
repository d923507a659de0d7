"""Integration: the MLflow UI (a real ``mlflow server``) in headless Chromium.

The ``diffusion`` experiment, created by :func:`diffusion.tracking.experiment_id`,
holds three runs. Chromium renders three pages and the test reads the DOM they end
with; it also saves a screenshot of the FID view next to the test's tmp files:

- the experiment, fresh browser: MLflow 3.17 opens its GenAI overview (the sidebar
  toggle decides, not the experiment), as docs/tracking.md's MLflow UI section says;
- the experiment after the toggle's one click (``workflowType=machine_learning``,
  what the toggle sets): the runs table;
- the ``FID`` view (Runs -> Views -> FID): sorted by FID, with FID, KID and final loss.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import BIN
from diffusion import tracking
from services import free_port, start, stop, wait_http

pytestmark = pytest.mark.integration

RUNS = {"trial-a": (167.0, 0.119, 0.051), "trial-b": (427.6, 0.623, 0.910), "trial-c": (98.2, 0.071, 0.034)}


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): no browser to render the MLflow UI")
    return path


def render(browser: str, url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The page's text once its scripts have run (a fresh profile: a first visit)."""
    shutil.rmtree(profile, ignore_errors=True)
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
            "--window-size=1600,1000", "--virtual-time-budget=20000"]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_the_experiment_opens_on_runs_with_the_fid_view(tmp_path, monkeypatch):
    browser = chromium()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = tracking.experiment_id("diffusion")
    client = MlflowClient(uri)
    for name, (fid, kid, loss) in RUNS.items():
        run = client.create_run(exp, run_name=name)
        for key, value in {"fid": fid, "kid": kid, "final_loss": loss, "bpd": 1.5, "loss": loss}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)

    port = free_port()
    log = tmp_path / "mlflow-server.log"
    server = start([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1"], env=dict(os.environ), cwd=tmp_path, log=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, log)
        base = f"http://127.0.0.1:{port}/#/experiments/{exp}"

        first_visit = render(browser, base, tmp_path / "profile")
        assert "Overview" in first_visit and "Traces" in first_visit and "matching runs" not in first_visit

        toggled = render(browser, f"{base}?workflowType=machine_learning", tmp_path / "profile")
        assert "Run Name" in toggled and "3 matching runs" in toggled and "Views" in toggled
        default_table = toggled[toggled.index("Run Name"):toggled.index("matching runs")]
        assert "Sort: Created" in toggled and "fid" not in default_table and "loss" not in default_table

        screenshot = tmp_path / "fid-view.png"
        view = render(browser, f"{base}/runs?workflowType=machine_learning&viewStateShareKey={tracking.RUNS_VIEW_ID}",
                      tmp_path / "profile", screenshot=screenshot)
        assert screenshot.stat().st_size > 10_000
    finally:
        stop(server)
    assert "Sort: fid" in view
    table = view[view.index("Run Name"):view.index("matching runs")]
    assert re.search(r"Metrics .*fid final_loss kid", table), table[:400]
    assert "bpd" not in table and " loss " not in table  # only the view's metrics are columns
    names = sorted(RUNS, key=lambda name: RUNS[name][0])
    assert [table.index(name) for name in names] == sorted(table.index(name) for name in names)  # by FID, lowest first
    assert re.search(r"98\.2 0\.034 0\.071 .*167 0\.051 0\.119 .*427\.6 0\.91 0\.623", table), table[:600]
