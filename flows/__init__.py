"""Prefect flows: ``train-pipeline``, ``train-sweep`` and ``promote``.

Flows orchestrate and hold no model logic: they run ``dvc`` (whose stages are the
``diffusion <stage>`` commands) as subprocesses, drive Optuna, and call
:mod:`diffusion.registry`. Deployments are declared in ``prefect.yaml``.
"""
