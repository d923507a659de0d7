"""Image diffusion models: schedules, the Gaussian process, samplers, U-Net and training.

Importing this package loads torch, torchvision, numpy and tqdm only; MLflow, DVC,
Prefect, Optuna and clean-fid are imported by the modules that use them.
"""

__version__ = "0.1.0"
