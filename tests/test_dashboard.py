"""`make dashboard`: optuna-dashboard over the study storage that params.yaml's
``sweep.storage`` names (null: the journal file .optuna/journal.log), on a real study."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from conftest import full_params
from services import MAKE, free_port, start, stop, wait_http


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_make_dashboard_serves_the_sweeps_study(tmp_path: Path):
    from diffusion.config import parse_params
    from flows.study import open_study

    params = full_params({"sweep": {"storage": None}})
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    study = open_study(parse_params(params).sweep, tmp_path, "dash", None, concurrency=1)  # as the sweep opens it
    trial = study.ask()
    trial.suggest_int("sample.steps", 2, 50)
    study.tell(trial, 12.5)
    assert (tmp_path / ".optuna" / "journal.log").is_file()

    port, log = free_port(), tmp_path / "dashboard.log"
    proc = start([*MAKE, "dashboard", f"DASHBOARD_PORT={port}"], env=dict(os.environ), cwd=tmp_path, log=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/studies", proc, log, timeout=60)
        listed = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [(s["study_name"], s["directions"]) for s in listed] == [("dash", ["minimize"])]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{listed[0]['study_id']}")
        assert [(t["number"], t["state"], t["values"], t["params"][0]["name"]) for t in detail["trials"]] == [
            (0, "Complete", [12.5], "sample.steps")
        ]
    finally:
        stop(proc)
    assert proc.returncode is not None
    assert "over .optuna/journal.log: dash" in log.read_text()
