"""Starting or joining Ray, the one place tunecv calls ``ray.init``: it joins
``RAY_ADDRESS`` (``ray job submit``) or starts a local Ray with Ray's defaults (dashboard
on 127.0.0.1, token authentication on), and quiets Tune's output where the search
prints its own.
"""

from __future__ import annotations

import logging
import os


def connect_ray() -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray, unless this process already joined one."""
    import ray

    # Tune's automatic CSV/JSON/TensorBoard loggers would duplicate what the study keeps
    # (and print a TensorBoard hint into Ray's temporary directory). Set before Tune runs.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune warns whenever checkpoints force frequent experiment snapshots, which short
    # CPU epochs always do; a snapshot costs ~10 ms here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A failed trial's traceback stays in its error.txt in the run; the search prints its
    # reason in one line instead of the whole traceback.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no per-trial "errored" blocks
    # "Trials did not complete" (failed trials are in the report, with their reason) and
    # Tune's result grid, which looks for the per-trial logs tunecv turned off above.
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR + 1)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
