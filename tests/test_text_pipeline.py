"""Text-to-image through the real pipeline (real DVC in a git repo, a real SQLite MLflow store).

`dvc repro` with ``model.conditioning: text`` on the tiny config: the prepare stage's measured
captions condition a U-Net through a char-level transformer learned with it; the sample stage
draws the evaluation prompts (a grid each in MLflow), evaluate scores FID beside the text
metrics and records the prompts in the FID protocol; `diffusion promote` registers the model,
and `diffusion generate models:/diffusion@champion --prompt ...` (and ``--prompts FILE``) draws
from it, as docs/text.md shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import TINY_PARAMS, copy_repo, pipeline_env, run_in
from diffusion.config import merge_params
from diffusion.stages.sample import prompts_digest

PROMPTS = ["a small, thin, upright two", "a large, thick, left-leaning seven", "a medium, regular, right-leaning zero"]
TEXT_PARAMS = merge_params(TINY_PARAMS, {
    "model.conditioning": "text",
    "text.overrides": {"width": 32, "depth": 1, "heads": 2, "max_length": 40},
    "sample.prompts": PROMPTS,
})


@pytest.mark.integration
def test_a_text_conditional_model_trains_samples_scores_registers_and_generates(tmp_path: Path, prepared_repo: Path):
    repo = copy_repo(prepared_repo, tmp_path / "repo", TEXT_PARAMS)
    run_in(repo, "dvc", "repro")

    manifest = json.loads((repo / "data/manifest.json").read_text())
    assert manifest["captions"]["source"] == "measured"
    with np.load(repo / "samples/samples.npz", allow_pickle=False) as npz:
        drawn = [str(p) for p in npz["prompts"]]
        tokens = npz["labels"]
    count = TINY_PARAMS["sample"]["num_samples"]
    assert drawn == [PROMPTS[k % 3] for k in range(count)] and tokens.shape == (count, 40)

    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["fid_low"] < evaluation["fid"] < evaluation["fid_high"]
    for name in ("thickness", "slant", "size"):
        assert 0 <= evaluation[f"text_{name}_agreement"] <= 1 and 0 <= evaluation[f"text_{name}_chance"] <= 1
        assert f"text_{name}_gap" in evaluation  # each prompt list asks for both ends of every attribute
    assert 0 <= evaluation["text_digit_accuracy"] <= 1 and 0 <= evaluation["text_error"] <= 1
    recorded = json.loads((repo / "metrics/protocol.json").read_text())
    assert recorded["prompts_sha256"] == prompts_digest(PROMPTS)
    assert recorded["digits"]["heldout_accuracy"] > 0.3  # 20 steps of the digit classifier: far above chance

    client = MlflowClient(pipeline_env(repo)["MLFLOW_TRACKING_URI"])
    sample_run = json.loads((repo / "samples/run.json").read_text())["run_id"]
    grids = sorted(a.path for a in client.list_artifacts(sample_run, "prompts"))
    assert grids == ["prompts/00-a-small--thin--upright-two.png", "prompts/01-a-large--thick--left-leaning-seven.png",
                     "prompts/02-a-medium--regular--right-leaning-zero.png"]
    assert client.get_run(sample_run).data.metrics["text_error"] == pytest.approx(evaluation["text_error"])

    run_in(repo, "diffusion", "promote")
    (repo / "prompts.txt").write_text("a thin, upright two\n\na thick, right-leaning seven\n")
    out = run_in(repo, "diffusion", "generate", "models:/diffusion@champion", "--prompt", "a thin, upright two", "-n", "4",
                 "--out", "generated")
    assert out.stdout.startswith("diffusion generate: 4 images")
    with np.load(repo / "generated/samples.npz", allow_pickle=False) as npz:
        assert [str(p) for p in npz["prompts"]] == ["a thin, upright two"] * 4 and npz["images"].shape == (4, 1, 28, 28)
    run_in(repo, "diffusion", "generate", "models:/diffusion@champion", "--prompts", "prompts.txt", "-n", "3",
           "--out", "generated/file")
    with np.load(repo / "generated/file/samples.npz", allow_pickle=False) as npz:
        assert [str(p) for p in npz["prompts"]] == ["a thin, upright two", "a thick, right-leaning seven", "a thin, upright two"]
    refused = run_in(repo, "diffusion", "generate", "models:/diffusion@champion", "-n", "2", "--out", "generated/none", check=False)
    assert refused.returncode == 1 and refused.stderr.endswith(  # after MLflow's download progress
        '\ndiffusion generate: error: --prompt: this model is text-conditional; give --prompt "a caption" (repeatable) or --prompts FILE\n'
    )
