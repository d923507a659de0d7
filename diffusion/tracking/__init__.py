"""Everything that talks to MLflow, one job a module:

- :mod:`~diffusion.tracking.store`: the tracking store, its URI (worked out there and
  nowhere else), a client of it, whether it answers, the experiment and its runs view;
- :mod:`~diffusion.tracking.runs`: the run a stage logs into, the process tags that tell a
  killed stage's run, and the params, metrics, dataset and artifacts that go into it;
- :mod:`~diffusion.tracking.metric_log`: per-step metrics sent from a background thread,
  kept in a file while the store is down;
- :mod:`~diffusion.tracking.model_format`: the data-only MLflow model (weights-only
  ``model.pt`` and an ``MLmodel``), logged and read back;
- :mod:`~diffusion.tracking.provenance`: the repository, its git commit and DVC's hashes.

The names the stages and flows use are importable from here. None of these modules can
change a stage's numbers, so none is among dvc.yaml's deps (tests/test_dvc_deps.py,
``INERT``). Importing them loads no MLflow: each function imports it when it runs.
"""

from diffusion.tracking.metric_log import MetricLog
from diffusion.tracking.model_format import (
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    WEIGHTS_SHA256_TAG,
    load_packaged_model,
    log_autoencoder,
    log_packaged_model,
)
from diffusion.tracking.provenance import dvc_lock_hashes, file_md5, git_commit, repo_root
from diffusion.tracking.runs import (
    RunFileError,
    end_run_offline,
    flatten,
    log_artifact,
    log_dataset,
    log_image,
    log_metrics,
    log_params,
    mirror_to_parent,
    read_run_id,
    set_tags,
    stage_run,
    write_run_id,
)
from diffusion.tracking.store import (
    RUNS_VIEW_ID,
    ExperimentDeletedError,
    StoreReadOnlyError,
    StoreSchemaError,
    StoreUnreachableError,
    check_store,
    default_tracking_uri,
    experiment_id,
    global_tracking_uri,
    mlflow_client,
    prepare_store,
    store_answers,
    tracking_uri,
)
