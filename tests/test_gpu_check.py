"""benchmarks/gpu_check.py in its tiny mode on the CPU: every section of the GPU check runs here
(or says why it is skipped), so the script is ready when a GPU is. What only a GPU shows (NCCL,
inductor's code, CUDA generators, the out-of-memory line) stays unchecked until then: docs/gpu.md."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT

SECTIONS = ["device", "train", "ddp", "samplers", "fid", "peers", "oom"]


def numbers(tree) -> Iterator[tuple[str, float]]:
    """(path, value) of every number in a JSON tree."""
    stack = [("", tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{key}", value) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", value) for i, value in enumerate(node))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            yield path, node


def test_gpu_check_tiny_runs_every_section_on_the_cpu(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"gpu_check --tiny failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == SECTIONS
    # diffusers is the bench extra (not in CI's venv): without it the section measures ours alone, and says so.
    expected = dict.fromkeys(SECTIONS, "ok") | {"oom": "skipped"}
    if importlib.util.find_spec("diffusers") is None:
        expected["peers"] = "skipped"
    assert {name: record["status"] for name, record in sections.items()} == expected, run.stdout[-4000:]
    assert report["ok"] and report["failed"] == []
    assert "skipped" in run.stdout and "all sections ok" in run.stdout

    assert report["mode"] == "tiny" and report["device_name"] == "CPU" and report["peak_bf16_flops"] is None
    for role in ("default", "dit"):
        train = sections["train"][role]
        assert set(train["variants"]) == {"bf16", "bf16+channels_last", "bf16+channels_last+compile"}
        assert train["flops_per_image"] > 0 and train["params"] > 0
        assert all(v["img_per_s"] > 0 and v["mfu"] is None for v in train["variants"].values())
        assert sections["peers"][role]["ours"]["img_per_s"] > 0
        if expected["peers"] == "ok":
            assert sections["peers"][role]["diffusers"]["img_per_s"] > 0
    assert sections["ddp"]["backend"] == "gloo" and sections["ddp"]["steps"] >= 1
    assert set(sections["samplers"]["samplers"]) >= {"ddpm", "ddim", "dpm++2m", "heun"}
    assert sections["samplers"]["batch_split_max_diff"] <= 2
    assert sections["fid"]["fid"] >= 0 and sections["fid"]["feature_device"] == "cpu"
    for path, value in numbers(report):
        assert math.isfinite(value), f"{path} is {value}"
