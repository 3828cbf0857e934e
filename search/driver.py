"""``tunecv run``: the search, from a validated config to a ranked report and an export.

Owns the wiring: resolve and validate the search space (before any compute), scan and
split the data once, then Ray Tune with an Optuna sampler (TPE: seeded, multivariate,
constant liar; or random) whose study lives in the run directory, ASHA over epochs,
and the trial trainable from ``search/trial.py``. After the search it ranks every
trial, writes the report and exports the winner. It holds no training code.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from ray import tune

from search.config import ConfigError, RunConfig
from search.records import (
    COMPLETED,
    FAILED,
    HEARTBEAT_S,
    METRICS_FILE,
    RECORD_FILE,
    SPACE_FILE,
    STATE_FILE,
    STOPPED_EARLY,
    TRIALS_DIR,
    TrialRecord,
    finish_record,
    read_epochs,
    read_state,
    write_record,
    write_state,
)
from search.report import write_run_report
from search.resume import (
    ResumePlan,
    check_driver_gone,
    check_same_config,
    plan_resume,
)
from search.searcher import (
    OPTUNA_JOURNAL,
    TRIAL_ID_KEY,
    create_scheduler,
    create_searcher,
    create_storage,
    searched_params,
)
from search.storage import RunLocation, locate_run, take_over
from search.trial import TrialContext, run_search_trial, trial_config
from search.train_job import create_run_dir, prepare_data
from search.winner import export_run_at
from trainables.metrics import RANKING_METRIC


def _load_space_checked(cfg: RunConfig, path: Path):
    """Load the space and build every warm-start recipe's config: all before Ray starts."""
    from search.space_catalog import load_space

    space = load_space(path)
    base = cfg.trial().model_dump(mode="json")
    context = TrialContext(run_dir="", base_config=base)
    for i, point in enumerate(space.warm_start_points()):
        try:
            trial_config(context, space.to_overrides(point))
        except ValueError as err:
            raise ConfigError(f"space '{path}': warm_start[{i}] gives an invalid trial config: {err}") from err
    return space


def _trial_resources(cfg: RunConfig) -> dict[str, float]:
    if cfg.scaling.num_workers > 0:
        # The trial only drives a TorchTrainer; a whole CPU here would deadlock small
        # clusters (2 CPUs: 1 for the trial + 1 for its worker, times 2 trials).
        return {"cpu": 0.01}
    resources = {"cpu": cfg.search.cpus_per_trial}
    if cfg.scaling.use_gpu:
        resources["gpu"] = cfg.scaling.gpus_per_worker
    return resources


def run_search(
    cfg: RunConfig,
    print_fn=print,
    callbacks: Sequence[tune.Callback] = (),
    run_dir: str | Path | None = None,
) -> Path:
    """Search, rank, report and export; return the run directory (this node's copy).

    An unfinished search is resumed: ``run_dir`` when it holds one, or else the newest
    unfinished ``output_dir/name-*`` whose driver is gone. Its config must equal
    ``cfg``; otherwise a ConfigError says so.

    Args:
        cfg: The validated run config.
        print_fn: Where progress lines go.
        callbacks: Extra Tune callbacks (benchmarks use one to time trials).
        run_dir: Where the run lives, a path or an object-store URI (created when
            missing, resumed when present).

    Raises:
        ConfigError: The space is invalid, the run to resume has another config or
            a live driver, or the cluster's nodes cannot all see the run directory;
            all before any training (an invalid space even before data or Ray).
    """
    from search.space_catalog import resolve_space_name

    space = None
    if cfg.search.space != "auto":
        space_path, note = resolve_space_name(cfg.search.space)
        space = _load_space_checked(cfg, space_path)
    run, resuming = locate_run(cfg, None if run_dir is None else str(run_dir))
    if resuming:
        try:
            check_same_config(run.local, cfg, str(run))
            check_driver_gone(run.local, str(run))
        except ConfigError:
            run.close()
            raise
        run = take_over(run)
    _connect(run)
    if resuming:
        print_fn(f"resuming run directory: {run}")
        space = _load_space_checked(cfg, run.local / SPACE_FILE)
    else:
        create_run_dir(cfg, run.local)
        print_fn(f"run directory: {run}")
        split = prepare_data(cfg, run.local, print_fn)
        if space is None:
            space_path, note = resolve_space_name("auto", num_train_images=len(split.train))
            space = _load_space_checked(cfg, space_path)
        print_fn(note)
        shutil.copyfile(space_path, run.local / SPACE_FILE)
        run.push(*(p.name for p in run.local.iterdir()))  # config, split, space
    _fit(cfg, space, run, print_fn, callbacks, resuming)
    write_run_report(run, print_fn)
    if cfg.search.export:
        _export(run, print_fn)
    return run.local


def _connect(run: RunLocation) -> None:
    """Join the cluster (``RAY_ADDRESS`` under ``ray job submit``) or start a local Ray,
    and check that every node can reach where the run lives."""
    import ray

    from search.storage import check_shared_storage

    if not ray.is_initialized():
        ray.init()
    check_shared_storage(run.uri.rsplit("/", 1)[0] if run.uri else run.local.parent)


def _export(run: RunLocation, print_fn) -> None:
    result = export_run_at(run)
    print_fn(
        f"exported {result.onnx_path}: ONNX macro-F1 {result.onnx_macro_f1:.4f} "
        f"(reported {result.reported_macro_f1:.4f}), argmax agreement {result.argmax_agreement:.4f}, "
        f"max |logit diff| {result.max_abs_logit_diff:.2e}"
    )


def _fit(cfg: RunConfig, space, run: RunLocation, print_fn, callbacks: Sequence[tune.Callback], resuming: bool) -> None:
    import optuna

    run_dir = run.local
    # Tune warns whenever checkpoints force frequent experiment snapshots, which short
    # CPU epochs always do; the snapshots themselves are cheap (~10 ms) here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage = create_storage(cfg.search.storage, run_dir)
    scheduler = create_scheduler(cfg)
    plan = ResumePlan((), (), cfg.search.num_samples, {}, 0, cfg.search.time_budget_s)
    if resuming:
        # Only the driver writes the journal, and check_driver_gone found it dead: a lock
        # it held when killed is stale (Optuna would wait 30 s before breaking it).
        (run_dir / f"{OPTUNA_JOURNAL}.lock").unlink(missing_ok=True)
        study = optuna.create_study(storage=storage, study_name=run.name, direction="maximize", load_if_exists=True)
        plan = plan_resume(run_dir, cfg, study)
        print_fn(
            f"{len(plan.finished)} trial(s) finished before; {len(plan.continuing)} continue under their own "
            f"id, from their last checkpoint if they have one ({', '.join(plan.continuing) or 'none'}); "
            f"{plan.num_samples} left to run"
        )
        if scheduler is not None:
            scheduler.replay(plan.history)
    heartbeat = Heartbeat(run)
    try:
        if plan.num_samples > 0:
            _tune(cfg, space, run, plan, storage, scheduler, [heartbeat, *callbacks], print_fn)
    except BaseException:
        heartbeat.finish("interrupted")  # resumable: `tunecv run` with the same name continues it
        raise
    if scheduler is not None:
        heartbeat.state["asha_rungs"] = scheduler.rungs()  # what the stop decisions were made on
    heartbeat.finish("finished")


def _tune(cfg, space, run: RunLocation, plan: ResumePlan, storage, scheduler, callbacks, print_fn) -> None:
    run_dir = run.local
    context = TrialContext(run_dir=str(run_dir), base_config=cfg.trial().model_dump(mode="json"), storage_uri=run.uri)
    trainable = tune.with_resources(tune.with_parameters(run_search_trial, context=context), _trial_resources(cfg))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=create_searcher(cfg, space, storage, run.name, resuming_after=plan.study_trials),
            scheduler=scheduler,
            num_samples=plan.num_samples,
            max_concurrent_trials=cfg.search.max_concurrent_trials,
            time_budget_s=plan.time_budget_s,
            trial_dirname_creator=lambda trial: f"tune_{trial.config[TRIAL_ID_KEY]}_{trial.trial_id}",
            # A fresh trial process costs ~4.4 s here (start-up, importing torch and
            # timm); reusing the actor brings a trial's fixed overhead to ~0.2 s. Not
            # for TorchTrainer trials: Tune reuses an actor only if the stopped trial's
            # thread ends within TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s), and Ray Train's
            # teardown often takes longer; Tune then aborts the next trial outright
            # (no retry, no callback). Their actor is a thin driver anyway.
            reuse_actors=cfg.scaling.num_workers == 0,
        ),
        run_config=tune.RunConfig(
            # Tune's own experiment state is not what resumes a run (the records and
            # the study are), so each driver gets a fresh directory for it.
            name=f"tune-{int(time.time())}",
            storage_path=str(run_dir / "tune"),
            # A crashed trial restarts, and continues from its last/ checkpoint.
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=[ProgressCallback(run, space, cfg.optim.epochs, cfg.search.max_failures, print_fn), *callbacks],
            verbose=0,
        ),
    )
    tuner.fit()


class Heartbeat(tune.Callback):
    """Keeps ``search_state.json`` saying this driver is alive, and the time it has spent.

    A resumed search counts the time earlier drivers spent against ``time_budget_s``;
    another host's driver decides from the heartbeat whether this one is gone.
    """

    def __init__(self, run: RunLocation) -> None:
        self.run = run
        self.run_dir = run.local
        previous = read_state(run.local)
        self.spent_before = float(previous.get("spent_s", 0.0))
        self.started = time.time()
        self.state = {
            "status": "running", "pid": os.getpid(), "hostname": socket.gethostname(),
            "started": self.started, "resumes": int(previous.get("resumes", -1)) + 1,
        }
        self.last = 0.0
        self.beat()

    def beat(self) -> None:
        self.last = time.time()
        write_state(self.run_dir, **self.state, heartbeat=self.last, spent_s=self.spent_before + self.last - self.started)
        self.run.push(STATE_FILE, OPTUNA_JOURNAL)  # object-store runs: what resuming needs

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.time() - self.last >= HEARTBEAT_S:
            self.beat()

    def finish(self, status: str) -> None:
        self.state.update(status=status, ended=time.time())
        self.beat()


class ProgressCallback(tune.Callback):
    """Prints one line per trial event and settles each trial's final status on disk."""

    def __init__(self, run: RunLocation, space, max_epochs: int, max_failures: int, print_fn=print) -> None:
        self.run = run
        self.run_dir = run.local
        self.space = space
        self.max_epochs = max_epochs
        self.max_failures = max_failures
        self.print = print_fn
        self.best: dict[str, float] = {}

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment state; under `ray job submit`
        # Ray has replaced builtins.print by then, and the captured one cannot pickle.
        return {**self.__dict__, "print": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, print=state["print"] or print)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        trial_id = trial.config[TRIAL_ID_KEY]
        score = result.get(RANKING_METRIC, float("nan"))
        self.best[trial_id] = max(score, self.best.get(trial_id, float("-inf")))
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(searched_params(trial.config).items()))
        self.print(
            f"[{trial_id}] epoch {result.get('epoch')}/{self.max_epochs} "
            f"{RANKING_METRIC} {score:.4f} (best {self.best[trial_id]:.4f})  {params}"
        )

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        # Object-store runs: the study must know this trial before its record exists
        # remotely, or a resume could hand its number (its id) to another trial.
        self.run.push(OPTUNA_JOURNAL)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.print(
            f"[{trial.config[TRIAL_ID_KEY]}] crashed; retry {trial.run_metadata.num_failures}/"
            f"{self.max_failures} continues from its last checkpoint"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        trial_id = trial.config[TRIAL_ID_KEY]
        self.run.pull(f"{TRIALS_DIR}/{trial_id}/{RECORD_FILE}", f"{TRIALS_DIR}/{trial_id}/{METRICS_FILE}")
        epochs = len(read_epochs(self.run_dir, trial_id))
        status = COMPLETED if epochs >= self.max_epochs else STOPPED_EARLY
        record = finish_record(self.run_dir, trial_id, status)
        self.run.push(f"{TRIALS_DIR}/{trial_id}/{RECORD_FILE}")
        self.print(f"[{trial_id}] {record.status} after {epochs} epoch(s)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        trial_id = trial.config[TRIAL_ID_KEY]
        reason = "trial process died; see the Tune log"
        self.run.pull(f"{TRIALS_DIR}/{trial_id}/{RECORD_FILE}")
        try:
            record = finish_record(self.run_dir, trial_id, FAILED, reason)
        except FileNotFoundError:  # died before writing its record: no trial may vanish
            params = searched_params(trial.config)
            record = TrialRecord(
                trial_id, params, self.space.to_overrides(params),
                max_epochs=self.max_epochs, status=FAILED, reason=reason, end_time=time.time(),
            )
            write_record(self.run_dir, record)
        self.run.push(f"{TRIALS_DIR}/{trial_id}/{RECORD_FILE}")
        self.print(f"[{trial_id}] failed: {record.reason}")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
