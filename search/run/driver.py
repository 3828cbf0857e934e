"""``tunecv run``: validate the space (before any compute), find or create the run, list
the data, join Ray and probe the storage, scan the data on Ray (a new run) or settle
what a dead driver left (a resume), search with Tune (``StudySearcher``, ASHA,
``search/run/trial.py``), then write the report and the export. Ray keeps the checkpoints at the run location;
this driver alone writes the study, its ``drivers/<k>.json``, the report and export.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from ray import tune

from search.config import ConfigError, RunConfig
from search.data import check_batch_sizes, list_run_data, scan_data
from search.drivers import FINISHED, INTERRUPTED, DriverRecord, read_drivers, spent_s
from search.layout import SPACE, SPLIT, tune_experiment
from search.ray_session import connect_ray
from search.run.capacity import check_trials_fit
from search.run.location import check_resumable, locate_run
from search.run.progress import Heartbeat, ProgressCallback, SearchStatus
from search.run.recorder import TIME_BUDGET_REASON, TrialRecorder
from search.run.resume import ResumePlan, plan_resume
from search.run.runners import keep_best_and_latest
from search.run.scheduler import create_scheduler
from search.run.searcher import StudySearcher, create_sampler
from search.run.trial import TrialContext, run_search_trial, trial_config
from search.space.catalog import parse_space, resolve_space_name
from search.space.model import SearchSpace
from search.storage import RunStorageFullError, RunStore, check_shared_storage, out_of_space, write_config
from search.study import HISTORY_KEY, TRIAL_ID_KEY, HistoryTrial, StudyHandle, open_study
from trainables.model.backbones import check_weights_file, local_weights
from trainables.data.datasets import DataSplit
from trainables.data.split_files import write_split


def check_space(cfg: RunConfig, text: str, source: str) -> SearchSpace:
    """Parse a space, check it fits the run's weights, build every warm-start recipe's
    config: all before Ray starts."""
    space = parse_space(text, source)
    if space.needs_pretrained and not cfg.model.pretrained:
        raise ConfigError(f"space '{source}' fine-tunes pretrained weights (needs_pretrained: true), but "
                          "model.pretrained is false. Use --space auto (a from-scratch space then), a space with "
                          "needs_pretrained: false, or set model.pretrained: true with weights.")
    _check_weights(cfg, space, source)
    base = cfg.trial().model_dump(mode="json")
    for i, point in enumerate(space.warm_start_points()):
        try:
            trial_config(base, space.to_overrides(point))
        except ValueError as err:
            raise ConfigError(f"space '{source}': warm_start[{i}] gives an invalid trial config: {err}") from err
    return space


def _check_weights(cfg: RunConfig, space: SearchSpace, source: str) -> None:
    """Every backbone the space may pick has its local weights, if the run names any."""
    model, backbones = cfg.model, space.backbone_names()
    if model.pretrained and model.weights_file is not None and backbones != [model.backbone]:
        raise ConfigError(f"model.weights_file holds weights for one backbone, but space '{source}' searches "
                          f"{backbones}. Put <timm name>.safetensors for each in a directory and set "
                          "model.weights_dir to it instead.")
    if not model.pretrained:
        return
    paths = {name: local_weights(model.model_copy(update={"backbone": name})) for name in backbones}
    if model.weights_dir is not None:
        missing = [f"  - {name}: {path}" for name, path in paths.items() if not path.is_file()]
        if missing:
            raise ConfigError("\n".join([f"model.weights_dir has no weights for {len(missing)} backbone(s) of "
                                         f"space '{source}'; put each file there or drop the backbone:",
                                         *missing]))
    for name, path in paths.items():  # each file holds its backbone, tensor by tensor (headers only)
        if path is not None and path.is_file():
            check_weights_file(name, path)


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
    run_dir: str | None = None,
    warm_points: Sequence[dict[str, Any]] | None = None,
    history: Sequence[HistoryTrial] = (),
    split: DataSplit | None = None,
    trial_resources: dict[str, float] | None = None,
    report: bool = True,
) -> RunStore:
    """Search, rank, report and export; return the run.

    An unfinished search is resumed: ``run_dir`` when it holds one, or else the newest
    unfinished ``output_dir/name-*`` whose driver is gone. Its config must equal ``cfg``.

    Args:
        cfg: The validated run config.
        print_fn: Where progress lines go.
        callbacks: Extra Tune callbacks (benchmarks use one to time trials).
        run_dir: Where the run lives, a path or an object-store URI (created when
            missing, resumed when present).
        warm_points: Trial parameters a new run enqueues first, in order, instead of the
            space's warm-start recipes (a retrain passes the champion run's best). What
            the space no longer has is dropped, and said.
        history: Finished trials of an earlier search (a retrain's champion run) that a
            new run's study holds as COMPLETE trials for the sampler to learn from. They
            carry no run-level id, so they are not the run's trials: no report row, no
            budget. One the space cannot hold whole is left out, and counted.
        split: ``cfg``'s data, already scanned by the caller (a retrain needs its
            fingerprint first); a new run scans it otherwise.
        trial_resources: The resources each trial's own process asks Tune for, as
            ``tune.with_resources`` takes them (``{"cpu": 0.25, "gpu": 0.5}``), instead of
            those derived from ``cfg`` (``search.cpus_per_trial``, ``scaling``). Ray
            Train workers, if any, still ask for theirs through ``scaling``. The trial
            trains where ``cfg`` says: logical GPUs asked for here do not make it use CUDA
            (``bench/cluster_sim.py`` packs trials onto logical GPUs of a simulated cluster).
        report: Write the run's report when the search ends. A retrain passes False and
            writes it after its gate, so the report's one writer can put the decision on top.

    Raises:
        ConfigError: The space is invalid, the run to resume is finished, has another
            config or a live driver, or the cluster's nodes cannot all see the run
            location; all before any training (an invalid space even before data or Ray).
        trainables.data.layouts.DataError: A new run's data cannot give a usable split;
            before Ray starts when its listing shows it (a missing root, a bad layout or
            manifest), and always before the run directory is created.
    """
    if cfg.data.loader == "ray_data" and cfg.scaling.num_workers == 0:
        # Tune puts an in-process trial's child tasks in its placement group, and Ray 2.60's
        # Ray Data then waits for ever for CPUs there (tests/test_stream.py shows it).
        raise ConfigError("data.loader ray_data needs scaling.num_workers >= 1 in a search: an in-process trial's "
                          "Ray Data tasks cannot get CPUs in Ray 2.60. Set scaling.num_workers: 1 (or more), or "
                          "data.loader: dataloader.")
    explicit = None  # (space, its file, a note), checked before anything else runs
    checked = None  # the space checked against the data's listing, before Ray
    if cfg.search.space != "auto":
        space_path, note = resolve_space_name(cfg.search.space)
        explicit = (check_space(cfg, space_path.read_text(), str(space_path)), space_path, note)
    store, resuming = locate_run(cfg, run_dir)
    driver = None
    if resuming:
        earlier = read_drivers(store)  # before the check: a driver started since is met at the claim of k
        check_resumable(store, cfg)
        driver = DriverRecord(store, earlier[-1].k + 1)  # the claim, before Ray (search/drivers.py)
    else:
        # A bad data root, layout or batch size fails on the data's listing, before Ray starts; the images
        # are then read by Ray tasks across the cluster (or the scan cache), and checked again when valid.
        listing = None if split else list_run_data(cfg)
        if listing is not None:
            most_train = listing.most_train_images(cfg.data.val_fraction, cfg.data.test_fraction, cfg.optim.seed)
            checked = _check_data_and_space(cfg, explicit, most_train)
    try:
        if resuming:  # before Ray: the run's space may name weights that are gone since
            space = check_space(cfg, store.read_text(SPACE), store.uri(SPACE))
        connect_ray()
        trial_resources = trial_resources or _trial_resources(cfg)
        check_trials_fit(cfg, trial_resources)
        if not resuming:
            split = split or scan_data(cfg, print_fn, listing)
            space, space_path, note = _check_data_and_space(cfg, explicit, len(split.train), checked)
        check_shared_storage(RunStore.at(store.location.rsplit("/", 1)[0]))
    except BaseException:
        if driver is not None:  # a resume refused before searching leaves the run resumable
            driver.finish(INTERRUPTED)
        raise
    print_fn(f"{'resuming run directory' if resuming else 'run directory'}: {store}")
    if not resuming:
        write_config(store, cfg)
        # From here on the run has a live driver: no other `tunecv run` takes it over.
        driver = DriverRecord(store, 1)
        _set_up(store, driver, split, space_path, note, print_fn)
    _search(cfg, space, store, driver, spent_s(earlier) if resuming else None, print_fn, callbacks, warm_points,
            history, trial_resources, report)
    return store


def _check_data_and_space(cfg: RunConfig, explicit, num_train: int, checked=None) -> tuple[SearchSpace, Path, str]:
    """The space for ``num_train`` training images (``explicit``, or the auto tier's),
    checked, with every batch size it may give. ``checked``: an earlier result, whose
    space is reused when the tier is the same (parsing it reads weights headers)."""
    space, space_path, note = explicit or (
        None, *resolve_space_name("auto", num_train, pretrained=cfg.model.pretrained))
    if space is None and checked is not None and checked[1] == space_path:
        space = checked[0]
    space = space or check_space(cfg, space_path.read_text(), str(space_path))
    check_batch_sizes(cfg, num_train, space.batch_size, str(space_path))
    return space, space_path, note


def _set_up(store: RunStore, driver: DriverRecord, split: DataSplit, space_path: Path, note: str,
            print_fn) -> None:
    """Write the scanned split, then ``space.yaml``: last, so a run without it never started."""
    try:
        write_split(split, store.uri(SPLIT))
    except BaseException:
        driver.finish(INTERRUPTED)
        raise
    print_fn(note)
    store.write_text(SPACE, space_path.read_text())


def _search(cfg: RunConfig, space: SearchSpace, store: RunStore, driver: DriverRecord, spent_before: float | None,
            print_fn, callbacks, warm_points: Sequence[dict[str, Any]] | None, history: Sequence[HistoryTrial],
            trial_resources: dict[str, float], report: bool = True) -> None:
    """Tune, then report and export; ``spent_before`` is None for a new run."""
    from search.results.report import write_run_report
    from search.results.winner import export_winner

    handle = open_study(store, cfg.search.storage)
    scheduler = create_scheduler(cfg)
    try:
        handle.study.sampler = create_sampler(cfg, seed_offset=len(handle.study.trials))
        if spent_before is not None:
            plan = plan_resume(handle, store, cfg, scheduler, spent_before)
            print_fn(
                f"{len(plan.finished)} trial(s) finished before; {len(plan.continuing)} continue under "
                f"their own id, from their last checkpoint if Ray kept one "
                f"({', '.join(plan.continuing) or 'none'}); {plan.num_samples} left to run"
            )
        else:
            plan = ResumePlan((), (), cfg.search.num_samples, cfg.search.time_budget_s)
            for point in _first_points(cfg, space, warm_points, print_fn):
                handle.study.enqueue_trial(point)
            _add_history(handle.study, space, history, print_fn)
        started = time.time()
        main = _main_phase(cfg, plan)
        done = main.num_samples <= 0 or _tune(cfg, space, store, driver, handle, scheduler, main, print_fn,
                                              callbacks, trial_resources)
        if done and cfg.search.finalists.enabled:
            left = None if plan.time_budget_s is None else plan.time_budget_s - (time.time() - started)
            done = _finalists(cfg, space, store, driver, handle, left, print_fn, callbacks, trial_resources)
    except BaseException as err:
        full = out_of_space(err)
        # Each step on its own: a journal that cannot be flushed must not keep the
        # driver's record RUNNING (a resume from another host would wait a minute).
        for step in (handle.flush, lambda: driver.finish(INTERRUPTED)):  # resumable by `tunecv run`
            try:
                step()
            except OSError:
                if full is None:
                    raise
        if full is not None:
            raise RunStorageFullError(
                f"no space left for run '{store}' ({full}). The study keeps every trial record written "
                f"before it. Free space there, then continue the search with `tunecv run --resume {store}`."
            ) from err
        raise
    handle.flush()
    if not done:
        driver.finish(INTERRUPTED)
        print_fn(f"search interrupted; continue it with `tunecv run --resume {store}`")
        return
    rungs = scheduler.rungs() if scheduler else None
    try:
        if cfg.search.export:
            export_winner(store, print_fn, int8=cfg.search.int8)
    finally:
        # The report comes after the export (report.html shows its verification) and is
        # written even when the export fails to verify. The search is over then too: a
        # resume would only export again; `tunecv export RUN` retries it on its own.
        try:
            if report:
                write_run_report(store, print_fn)
        finally:
            driver.finish(FINISHED, asha_rungs=rungs)


def _main_phase(cfg: RunConfig, plan: ResumePlan) -> ResumePlan:
    """``plan`` for the search itself: with finalists, their share of the time budget is
    kept back, and nothing new starts once they were chosen (a resumed run)."""
    settings = cfg.search.finalists
    if not settings.enabled or plan.time_budget_s is None:
        return plan
    budget = plan.time_budget_s - settings.budget_share * cfg.search.time_budget_s
    return ResumePlan(plan.finished, plan.continuing, plan.num_samples if budget > 0 else 0, budget)


def _finalists(cfg: RunConfig, space: SearchSpace, store: RunStore, driver: DriverRecord, handle: StudyHandle,
               time_left_s: float | None, print_fn, callbacks, trial_resources: dict[str, float]) -> bool:
    """Choose the finalists once, queue their repeats, run what is queued; False when
    interrupted (``search/run/finalists.py``)."""
    from search.results.trials import load_run
    from search.run.finalists import chosen_finalists, choose_finalists, enqueue_finalists, queued_finalists
    from trainables.data.split_files import read_split

    study = handle.study
    if chosen_finalists(study) is None:
        trials = load_run(store).trials
        chosen, why = choose_finalists(store, trials, read_split(store.uri(SPLIT)), cfg)
        enqueue_finalists(study, trials, chosen, cfg)
        handle.flush()
        print_fn(f"finalists: {', '.join(chosen)} ({why}); each runs {cfg.search.finalists.repeats} more time(s) "
                 "with other seeds, and the best mean wins" if chosen else f"finalists: none ({why})")
    queued = len(queued_finalists(study))
    if queued == 0:
        return True
    if time_left_s is not None and time_left_s <= 0:
        print_fn(f"finalists: {queued} run(s) left out: the time budget is spent")
        return True
    plan = ResumePlan((), (), queued, time_left_s)
    return _tune(cfg, space, store, driver, handle, None, plan, print_fn, callbacks, trial_resources,
                 finalists=True)


def _first_points(cfg: RunConfig, space: SearchSpace, warm_points, print_fn) -> list[dict[str, Any]]:
    """What a new run tries first: ``warm_points`` fitted to the space, or its recipes."""
    if warm_points is None:
        return space.warm_start_points() if cfg.search.warm_start else []
    points = []
    for i, params in enumerate(warm_points):
        point, dropped = space.fit_point(params)
        for name, why in dropped.items():
            print_fn(f"warm start {i + 1}: dropped {name}={params[name]!r}: {why}")
        points.append(point)
    return points


def _add_history(study, space: SearchSpace, history: Sequence[HistoryTrial], print_fn) -> None:
    import optuna

    kept = 0
    for trial in history:
        point, dropped = space.fit_point(trial.params)
        dists = space.distributions_of(point)
        if dropped or dists is None or set(dists) != set(point):
            continue  # TPE would read a partial point as a different configuration
        study.add_trial(optuna.trial.create_trial(params=point, distributions=dists, value=trial.value,
                                                  user_attrs={HISTORY_KEY: trial.source}))
        kept += 1
    if history:
        print_fn(f"history: {kept} earlier trial(s) added to the study for the sampler"
                 + (f"; {len(history) - kept} left out: their parameters no longer fit the space"
                    if kept < len(history) else ""))


def _tune(cfg: RunConfig, space: SearchSpace, store: RunStore, driver: DriverRecord, handle: StudyHandle,
          scheduler, plan: ResumePlan, print_fn, callbacks, trial_resources: dict[str, float],
          finalists: bool = False) -> bool:
    """Run Tune until ``plan``'s trials are done; False when it was interrupted instead.
    ``finalists``: run the queued finalist repeats (FIFO) in the driver's second experiment."""
    context = TrialContext(store, driver.state.k, cfg.trial().model_dump(mode="json"), space,
                           cfg.search.trial_timeout_s, finalists)
    trainable = tune.with_resources(tune.with_parameters(run_search_trial, context=context), trial_resources)
    searcher = StudySearcher(handle, space, finalists)
    progress = ProgressCallback(cfg.optim.epochs, cfg.search.max_failures, print_fn)
    status = SearchStatus(plan.num_samples, plan.time_budget_s, print_fn)
    recorder = TrialRecorder(searcher, store, driver.state.k, cfg.optim.epochs,
                             listeners=(progress.ended, status.ended), finalists=finalists)
    started = time.time()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.num_samples,
            max_concurrent_trials=cfg.search.max_concurrent_trials,
            time_budget_s=plan.time_budget_s,
            trial_dirname_creator=lambda trial: trial.config[TRIAL_ID_KEY],
            # A fresh trial process costs ~4.4 s here (start-up, importing torch and
            # timm); reusing the actor brings a trial's fixed overhead to ~0.2 s. Not
            # for TorchTrainer trials: Tune reuses an actor only if the stopped trial's
            # thread ends within TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s), and Ray Train's
            # teardown often takes longer; Tune then aborts the next trial outright
            # (no retry, no callback). Their actor is a thin driver anyway.
            reuse_actors=cfg.scaling.num_workers == 0,
        ),
        run_config=tune.RunConfig(
            # One experiment per driver: Tune's own files (tuner.pkl, experiment state)
            # then have one writer each, and a continued trial's checkpoints never
            # collide with those an earlier driver wrote (Tune numbers them from 0).
            name=tune_experiment(driver.state.k, finalists),
            storage_path=store.fs_path(),
            storage_filesystem=store.filesystem,
            checkpoint_config=keep_best_and_latest(tune.CheckpointConfig),
            # A crashed trial restarts, and continues from its latest checkpoint.
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=[recorder, progress, status, Heartbeat(driver), *callbacks],
            verbose=0,
        ),
    )
    with status.shown():
        tuner.fit()
    if not searcher.live:
        return True
    # Tune ends running trials without a callback when time_budget_s runs out, or when
    # it stops on Ctrl-C; then they stay RUNNING in the study and a resume continues them.
    if plan.time_budget_s is not None and time.time() - started >= plan.time_budget_s:
        recorder.stop_unfinished(TIME_BUDGET_REASON)
        return True
    return False
