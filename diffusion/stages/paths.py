"""The files the stages write and read, relative to the repository root.

dvc.yaml's deps, outs, metrics and plots name the same paths. They live here rather
than in the stage that writes them so that importing one stage does not import
another's libraries (prepare's torchvision datasets and clean-fid, for one).
"""

from pathlib import Path

# prepare
TRAIN_SET = Path("data/train.npz")
HELDOUT_SET = Path("data/heldout.npz")
REFERENCE = Path("data/reference.npz")  # Inception statistics of the FID reference images
MANIFEST = Path("data/manifest.json")
# train
MODEL = Path("models/model.pt")
MODEL_RUN = Path("models/run.json")  # the MLflow run that trained the model
TRAIN_METRICS = Path("metrics/train.json")
LOSS_CURVE = Path("plots/train_loss.csv")
CHECKPOINTS = Path("checkpoints")  # not a DVC out: resume state, one folder per config
# sample
SAMPLES = Path("samples/samples.npz")
GRID = Path("samples/grid.png")
SAMPLE_RUN = Path("samples/run.json")  # the nested sample run that evaluate logs into
# evaluate
EVALUATE_METRICS = Path("metrics/evaluate.json")
FID_PROTOCOL = Path("metrics/protocol.json")  # how the FID was measured (diffusion/protocol.py)
FID_CURVE = Path("plots/fid_vs_samples.csv")
