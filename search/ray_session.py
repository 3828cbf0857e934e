"""Starting or joining Ray, the one place tunecv calls ``ray.init``: it joins
``RAY_ADDRESS`` (``ray job submit``, a cluster) and changes nothing there, or starts a
private local Ray: every listener on 127.0.0.1, token authentication on (Ray's
default). It also quiets Tune's output where the search prints its own.
"""

from __future__ import annotations

import logging
import os

from search.ray_reaper import start_reaper

# The watcher of the local Ray this process started; kept so that its pipe's write end
# stays open until this process ends.
_reaper = None


def connect_ray() -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray, unless this process already joined one."""
    import ray

    # Tune's automatic CSV/JSON/TensorBoard loggers would duplicate what the study keeps
    # (and print a TensorBoard hint into Ray's temporary directory). Set before Tune runs.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's experiment state is for Tuner.restore, which tunecv never uses: a search
    # resumes from its Optuna study. Its snapshot holds every trial (~25 KB each here) and
    # was uploaded after every trial checkpoint, to a bucket too: quadratic in trials.
    _no_forced_experiment_syncs()
    _no_result_grid_reads()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "300")  # a periodic snapshot, every 5 min
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A failed trial's traceback stays in its error.txt in the run; the search prints its
    # reason in one line instead of the whole traceback.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # A trial that fails for good says so in a result without the metric first
    # (search/run/trial.py); Tune would reject that result as a malformed report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no per-trial "errored" blocks
    # "Trials did not complete" (failed trials are in the report, with their reason) and
    # Tune's result grid, which looks for the per-trial logs tunecv turned off above.
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR + 1)
    # "Token authentication is enabled for this Ray cluster": it stays on (docs/security.md);
    # the warning only says so, on every local start.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    _listen_on_loopback_only()
    # "local": a Ray of its own, never one a `ray start` on this host left running.
    ray.init(address="local", logging_level=logging.WARNING)
    global _reaper
    _reaper = start_reaper()  # its pipe lives as long as this process (search/ray_reaper.py)


def _no_forced_experiment_syncs() -> None:
    """Ray 2.60 private API, used here only: with ``CheckpointConfig(num_to_keep)`` Tune
    forces a snapshot and upload of its whole experiment state once a trial has saved
    ``num_to_keep`` checkpoints since the last one (``_ExperimentCheckpointManager.
    on_trial_checkpoint``), to keep Tuner.restore's view of the latest checkpoint exact.
    tunecv keeps 1, so every epoch of every trial re-uploaded the state of all trials: on
    moto's S3, 536 requests a trial at trials 20-34 and 1,411 at 136-150, nearly all Tune's
    (bench/results/cluster_sim_150_s3.json). The periodic snapshot stays."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    _ExperimentCheckpointManager.on_trial_checkpoint = lambda self, trial: None


def _no_result_grid_reads() -> None:
    """Ray 2.60 private API, used here only: ``Tuner.fit`` ends by building its result
    grid from an ``ExperimentAnalysis``, which looks for each trial's ``result.json`` and
    ``progress.csv`` in the run's storage, one trial after another. tunecv turned those
    loggers off (above) and never reads the grid: a search's results are its Optuna
    study. On S3 each missing file costs a HEAD and a LIST, so the search's end waited on
    4 requests a trial: 95 s from the last trial's end to the report line at 1,000 trials
    on moto's S3 (bench/results/cluster_sim_1000_s3.json at 31da1ca), 9.5 s at 150."""
    from ray.tune.analysis.experiment_analysis import ExperimentAnalysis

    ExperimentAnalysis._fetch_trial_dataframes = lambda self: {}


def _listen_on_loopback_only() -> None:
    """Make the Ray this process starts bind GCS, raylet, object manager, workers,
    dashboard, its agents and the metrics endpoints to 127.0.0.1.

    Ray 2.60 has no bind-address setting: each listener binds the node's IP, and a plain
    ``ray.init()`` picks the outbound interface (GCS, raylet and workers then listen on
    every interface, the metrics ports on 0.0.0.0). Ray uses 127.0.0.1 as the node IP
    when clusters are off, its mode for Windows and macOS, set by
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` but read once when Ray is imported, which
    the CLI has done by now; hence the constant. Only a Ray started here is affected:
    a driver joining ``RAY_ADDRESS`` must keep its reachable IP.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
