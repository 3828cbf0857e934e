"""``tunecv retrain --config run.yaml``: one scheduled retraining, from snapshot to alias.

The steps, each safe to repeat (a schedule may tick twice, a retrain may be killed):

1. Take the model's retrain lock in ``output_dir``; a second retrain of the same model
   there refuses at once. Reach the registry and read the champion.
2. Scan ``retrain.snapshot``. If its fingerprint is the champion's, or a retrain already
   decided on it, say so and stop: nothing is trained twice, and an old snapshot seen
   again never moves an alias back.
3. Search it in ``<output_dir>/<model>-retrain-<fingerprint>-<n>``, the champion run's
   top-k configurations first and the ``retrain`` section's budget. An interrupted
   search there is continued; one that never got past its set-up is started over in
   the next ``n``. Either is said.
4. Score both ONNX exports on the new held-out test split and decide (``gate``); the
   decision goes into the run directory as ``gate.json`` and ``gate.md`` (written once,
   by this job) before the registry hears of it. A challenger whose export failed the
   parity check is refused there, and nothing is registered.
5. Register the challenger and move the aliases (``registry``: champion last, and only
   if the champion is still the version the gate compared with).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from search.config import ConfigError, RunConfig
from search.data import scan_data
from search.drivers import is_finished, live_driver, read_drivers
from search.layout import CONFIG, EXPORT, GATE_JSON, GATE_MARKDOWN, REPORT_HTML, SPACE, SPLIT
from search.retrain.gate import Decision, decide, describe, refuse_export, score_bundle, unseen_split
from search.retrain.registry import (
    ABANDONED, CHALLENGER, CHAMPION, DECISION, FINGERPRINT, GATED_AGAINST, REGISTERED, REGISTERING, RUN_DIR,
    SNAPSHOT, STATE, TRIAL, Registry, Version, metric_key, registry_uri,
)
from search.retrain.warm import history_trials, top_configurations
from search.storage import RunStore
from trainables.data.datasets import DataSplit
from trainables.data.split_files import read_split
from trainables.data.locations import is_uri
from trainables.training.metrics import RANKING_METRIC

PrintFn = Callable[[str], None]


class RetrainBusyError(ConfigError):
    """Another retrain of the same model holds the lock."""


@contextmanager
def retrain_lock(lock_dir: Path, model_name: str) -> Iterator[None]:
    """An exclusive, non-blocking lock per model and output directory; the kernel drops
    it when the process dies, so a killed retrain never leaves a stale lock behind."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f".retrain-{model_name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainBusyError(
                f"another `tunecv retrain` of model '{model_name}' is running (it holds {path}); this one "
                "stops without doing anything. Wait for it to finish; a schedule should not start retrains "
                "closer together than one takes (concurrencyPolicy: Forbid in the cluster/ manifests)."
            ) from None
        yield


def retrain(cfg: RunConfig, print_fn: PrintFn = print) -> Decision | None:
    """Run one retrain (module docstring); the gate's decision, or None when nothing was
    retrained because the snapshot had been seen.

    Raises:
        ConfigError: No ``retrain`` section, an ``output_dir`` in an object store (the
            lock and the default registry need a filesystem), or another retrain of the
            model is running; all before any compute.
    """
    if cfg.retrain is None:
        raise ConfigError("tunecv retrain needs a `retrain:` section in the run file (model_name, snapshot, "
                          "num_samples); see docs/retraining.md.")
    if is_uri(cfg.output_dir):
        raise ConfigError(f"output_dir: tunecv retrain needs a local or shared filesystem (it holds the per-model "
                          f"lock and the default registry), got {cfg.output_dir}; use a path such as "
                          "/mnt/shared/runs.")
    # Resolved once: a `latest` symlink that the data pipeline moves during a long
    # retrain must not change what its later trials read.
    snapshot = cfg.retrain.snapshot if is_uri(cfg.retrain.snapshot) else str(Path(cfg.retrain.snapshot).resolve())
    section = cfg.retrain.model_copy(update={"snapshot": snapshot})
    cfg = cfg.model_copy(update={"retrain": section, "data": cfg.data.model_copy(update={"root": section.snapshot})})
    out = Path(cfg.output_dir)
    with retrain_lock(out, section.model_name):
        embedded = not (section.registry_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        registry = Registry(registry_uri(section.registry_uri, cfg.output_dir), section.model_name,
                            out / "mlflow-artifacts" if embedded else None)
        registry.check_reachable()  # before the scan: an unusable registry is one line, nothing done
        return _retrain(cfg, registry, print_fn)


def _retrain(cfg: RunConfig, registry: Registry, print_fn: PrintFn) -> Decision | None:
    section = cfg.retrain
    champion = registry.alias(CHAMPION)
    snapshot = scan_data(cfg, print_fn)  # data.root is the snapshot; the search reuses this scan
    fingerprint = snapshot.fingerprint()
    print_fn(f"snapshot {section.snapshot}: fingerprint {fingerprint[:12]}, {len(snapshot.train)} train / "
             f"{len(snapshot.val)} val images; champion: "
             + (f"version {champion.number} (fingerprint {champion.fingerprint[:12]})" if champion else "none yet"))
    if champion is not None and champion.fingerprint == fingerprint:
        print_fn(f"the champion (version {champion.number}) was trained on this snapshot; nothing to retrain")
        return None
    versions = registry.versions()
    for version in versions:
        if version.fingerprint == fingerprint and version.state == REGISTERING:
            print_fn(f"version {version.number} was left half-registered by a retrain that stopped; marking it "
                     f"{ABANDONED} and registering again")
            registry.mark(version, STATE, ABANDONED)
    registered = [v for v in versions if v.state == REGISTERED]
    decided = next((v for v in reversed(registered) if v.fingerprint == fingerprint), None)
    if decided is not None:
        _finish_decided(registry, decided, decided is registered[-1], champion, print_fn)
        return None

    trained = _champion_trained(champion, snapshot, print_fn) if champion is not None else set()
    store = _run_dir(cfg, fingerprint, print_fn)
    decision = _decided_in(store)
    if decision is None:
        if not (store.exists(SPACE) and is_finished(read_drivers(store))):
            export_error = _search(cfg, store, champion, snapshot, print_fn)
        else:
            export_error = None if store.exists(f"{EXPORT}/model.onnx") else "the finished search has no export"
        decision = _gate(cfg, store, registry, champion, snapshot, trained, export_error, print_fn)
    if not store.exists(REPORT_HTML):  # its one writer, after the gate: the decision heads the report
        from search.results.report import write_run_report

        write_run_report(store, print_fn)
    if decision.challenger is None:  # the export failed parity: nothing to register
        print_fn(f"not registered: {decision.reasons[0]}; the champion stays")
        return decision
    _register(cfg, store, registry, decision, fingerprint, print_fn)
    return decision


def _finish_decided(registry: Registry, version: Version, newest: bool, champion: Version | None,
                    print_fn: PrintFn) -> None:
    """A retrain of this snapshot registered its candidate before. The newest candidate
    gets what a crash may have left undone (its aliases); an older one moves nothing."""
    print_fn(f"this snapshot was retrained before: version {version.number}, gate decision "
             f"{version.tags.get(DECISION)}; nothing is trained again")
    if not newest:
        print_fn("newer versions were registered since; the aliases stay where they are")
        return
    registry.point(CHALLENGER, version)
    if version.tags.get(DECISION) == "promote" and (champion is None or champion.number != version.number):
        _promote(registry, version, version.tags.get(GATED_AGAINST), champion, print_fn)


def _promote(registry: Registry, version: Version, gated_against: str | None, champion: Version | None,
             print_fn: PrintFn) -> None:
    """Move ``champion`` to ``version``, unless it moved since the gate compared with it."""
    current = champion.number if champion else "none"
    if gated_against != current:
        print_fn(f"champion is version {current}, but the gate compared with {gated_against}; not moving it. "
                 "Retrain a new snapshot to gate against the current champion.")
        return
    registry.point(CHAMPION, version)
    print_fn(f"champion -> version {version.number}")


def _run_dir(cfg: RunConfig, fingerprint: str, print_fn: PrintFn) -> RunStore:
    """The first attempt directory for this snapshot that is finished, resumable or new."""
    base = RunStore.at(cfg.output_dir)
    n = 1
    while True:
        store = base.child(f"{cfg.retrain.model_name}-retrain-{fingerprint[:12]}-{n}")
        if not store.exists(CONFIG):
            return store
        if store.exists(SPACE):
            drivers = read_drivers(store)
            if is_finished(drivers):
                print_fn(f"the search on this snapshot finished before ({store}); continuing from its result")
            elif live_driver(drivers) is None:
                print_fn(f"continuing the interrupted search in {store}")
            return store
        print_fn(f"{store} never finished its set-up; starting over in the next attempt directory")
        n += 1


def _decided_in(store: RunStore) -> Decision | None:
    """The gate's decision, if a retrain killed after the gate left one in the run."""
    return Decision.from_json(store.read_text(GATE_JSON)) if store.exists(GATE_JSON) else None


def _search(cfg: RunConfig, store: RunStore, champion: Version | None, snapshot: DataSplit,
            print_fn: PrintFn) -> str | None:
    """Search the snapshot into ``store``; the export's error when it failed the parity check."""
    from search.export.bundle import ExportError
    from search.run.driver import run_search

    section = cfg.retrain
    searched = cfg.model_copy(update={
        "name": f"{section.model_name}-retrain",
        "search": cfg.search.model_copy(update={"export": True, **({
            "num_samples": section.num_samples,
            # A later retrain without retrain.time_budget_s keeps search.time_budget_s: it had run uncapped.
            "time_budget_s": section.time_budget_s or cfg.search.time_budget_s} if champion else {})}),
    })
    warm, history = None, []
    if champion is not None:
        previous = RunStore.at(champion.tags[RUN_DIR])
        if section.top_k:
            warm = top_configurations(previous, section.top_k)
            print_fn(f"warm start: the top {len(warm)} configuration(s) of the champion's run {previous} first")
            if len(warm) >= section.num_samples:
                print_fn(f"warning: retrain.num_samples {section.num_samples} is not more than the "
                         f"{len(warm)} configuration(s) warm-started from retrain.top_k: this retrain only "
                         "replays the champion's configurations and tries no new one; raise retrain.num_samples")
        if section.history:
            history = history_trials(previous, champion.fingerprint)
    try:
        run_search(searched, print_fn=print_fn, run_dir=store.location, warm_points=warm, history=history,
                   split=snapshot, report=False)
    except ExportError as err:
        return str(err)
    return None


@contextmanager
def _bundle(store: RunStore) -> Iterator[Path]:
    """The run's verified export as a local directory."""
    with store.local_files(EXPORT, store.list_names(EXPORT)) as local:
        yield local


def _champion_trained(champion: Version, snapshot: DataSplit, print_fn: PrintFn) -> set[str]:
    """The content hashes of the champion's training images (its run's split), and, said in
    numbers, how many of this snapshot's validation and test images are among them."""
    store = RunStore.at(champion.tags[RUN_DIR])
    if not store.exists(SPLIT):
        print_fn(f"the champion's run {store} has no {SPLIT}: which images it trained on cannot be checked")
        return set()
    trained = {sample.sha1 for sample in read_split(store.uri(SPLIT)).train}
    seen = {which: sum(s.sha1 in trained for s in snapshot.samples(which)) for which in ("val", "test")}
    print_fn(f"the champion trained on {seen['val']} of this snapshot's {len(snapshot.val)} validation images and "
             f"{seen['test']} of its {len(snapshot.test)} test images; the gate scores only images neither model "
             "trained on")
    return trained


def _gate(cfg: RunConfig, store: RunStore, registry: Registry, champion: Version | None, split: DataSplit,
          trained: set[str], export_error: str | None, print_fn: PrintFn) -> Decision:
    """Score both exports on ``split``'s images that neither model trained on (``trained``:
    the champion's, by content) and decide."""
    section = cfg.retrain
    against = champion.number if champion else None
    if export_error is not None:
        decision = refuse_export(export_error, against, section.min_gain, section.max_class_drop)
    else:
        split, left_out = unseen_split(split, trained)
        with _bundle(store) as bundle:
            challenger = score_bundle(bundle, split)
        champion_score = None
        if champion is not None:
            with tempfile.TemporaryDirectory(prefix="tunecv-champion-") as tmp:
                champion_score = score_bundle(registry.download(champion, Path(tmp)), split)
        decision = replace(decide(challenger, champion_score, against, section.min_gain, section.max_class_drop),
                           left_out=left_out)
    store.write_text(GATE_JSON, decision.to_json())  # first: its presence means the gate has decided
    store.write_text(GATE_MARKDOWN, describe(decision))
    print_fn(describe(decision).rstrip())
    return decision


def _register(cfg: RunConfig, store: RunStore, registry: Registry, decision: Decision, fingerprint: str,
              print_fn: PrintFn) -> None:
    from search.results.trials import load_run
    from search.results.winner import best_checkpoint

    exported, _ = best_checkpoint(store)  # the trial the export holds
    (trial,) = [t for t in load_run(store).trials if t.trial_id == exported]
    metrics = {RANKING_METRIC: decision.challenger.macro_f1,
               **{f"f1.{metric_key(c)}": f1 for c, f1 in decision.challenger.per_class_f1.items()}}
    if decision.champion is not None:
        metrics[f"champion_{RANKING_METRIC}"] = decision.champion.macro_f1
    tags = {FINGERPRINT: fingerprint, RUN_DIR: store.location, TRIAL: exported,
            SNAPSHOT: str(cfg.retrain.snapshot), DECISION: "promote" if decision.promote else "refuse",
            GATED_AGAINST: decision.champion_version or "none"}
    with _bundle(store) as bundle:
        version = registry.register(bundle, trial.params, metrics, tags)
    registry.point(CHALLENGER, version)
    print_fn(f"registered {registry.name} version {version.number} ({registry.uri}); challenger -> "
             f"{version.number}")
    if decision.promote:
        _promote(registry, version, tags[GATED_AGAINST], registry.alias(CHAMPION), print_fn)
    else:
        print_fn("champion stays")
