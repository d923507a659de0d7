"""Image diffusion models and the pipeline that trains, samples, evaluates and promotes them.

Grouped by layer: ``process/`` (the noise process and its schedules), ``sampling/`` (the
denoiser, guidance, step schedules and solvers), ``models/`` (U-Net, DiT, DiffiT, the
noise-aware classifier and the KL autoencoder), ``training/``, ``data/``, ``evaluation/``,
``stages/`` (one module per DVC stage), and the MLflow bookkeeping (``tracking``, ``registry``).

Importing the package itself imports nothing: each module imports what it uses, so torch,
MLflow, DVC, Prefect, Optuna and clean-fid load only with a module that needs them.
"""

__version__ = "0.1.0"
