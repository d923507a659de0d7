"""Text-to-image through the real pipeline (real DVC in a git repo, a real SQLite MLflow store).

`dvc repro` with ``model.conditioning: text`` on the tiny config: the prepare stage's measured
captions condition a U-Net through a char-level transformer learned with it; the sample stage
draws the evaluation prompts (a grid each in MLflow), evaluate scores FID beside the text
metrics and records the prompts in the FID protocol; `diffusion promote` registers the model,
and `diffusion generate models:/diffusion@champion --prompt ...` draws
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
    out = run_in(repo, "diffusion", "generate", "models:/diffusion@champion", "--prompt", "a thin, upright two", "-n", "16")
    assert out.stdout.startswith("diffusion generate: 16 images")
    with np.load(repo / "generated/samples.npz", allow_pickle=False) as npz:  # --out's default
        assert [str(p) for p in npz["prompts"]] == ["a thin, upright two"] * 16 and npz["images"].shape == (16, 1, 28, 28)


@pytest.mark.integration
def test_a_pretrained_encoder_trains_frozen_on_embeddings_encode_text_cached(tmp_path: Path, prepared_repo: Path, monkeypatch):
    """``text.encoder`` a folder saved with save_pretrained (a tiny CLIP built here): encode_text
    writes the embeddings of every distinct training caption and of the empty one, train runs on
    them, and the model file holds the encoder's weights unchanged (frozen) and loads back."""
    import torch
    from test_text_encoder import _save_tiny

    from diffusion.data.dataset import load_dataset
    from diffusion.models.text import PretrainedTextEncoder, load_text_embedding_cache
    from diffusion.packaged import PackagedDiffusion

    params = merge_params(TEXT_PARAMS, {"text": {"encoder": "encoders/clip", "overrides": {}, "cache": True},
                                        "train": {"steps": 4, "checkpoint_every": 4, "log_every": 2}})
    repo = copy_repo(prepared_repo, tmp_path / "repo", params)
    _, clip = _save_tiny(repo / "encoders" / "clip", "clip")
    out = run_in(repo, "dvc", "repro", "train")

    monkeypatch.chdir(repo)  # the model file names the encoder's folder as text.encoder did: relative to the repository
    cache = load_text_embedding_cache("data/text_embeddings.npz")
    model = PackagedDiffusion.load("models/model.pt")
    encoder = model.net.text_encoder
    assert isinstance(encoder, PretrainedTextEncoder) and model.model_spec["text_encoder"]["name"] == "encoders/clip"
    distinct = torch.unique(encoder.tokenize([*load_dataset("data/train.npz").captions, ""]), dim=0)
    assert torch.equal(cache["ids"], distinct)
    assert f"encode_text: {len(distinct)} distinct captions encoded by encoders/clip" in out.stdout
    for name, weight in clip.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], weight), name  # frozen through training
    torch.testing.assert_close(encoder.encode(distinct[:5]).pooled, cache["pooled"][:5])
