"""``tunecv retrain --config run.yaml``: one scheduled retraining, from snapshot to alias.

The steps, each safe to repeat (a schedule may tick twice, a retrain may be killed):

1. Take the model's retrain lock; a second retrain of the same model refuses at once.
2. Scan ``retrain.snapshot``. If its fingerprint is the champion's, or a finished
   retrain already decided on it, say so and stop: nothing is trained twice.
3. Search it in ``<output_dir>/<model>-retrain-<fingerprint>-<n>``, the champion run's
   top-k configurations first and the ``retrain`` section's budget. An interrupted
   search there is continued; one that never got past its set-up is started over in
   the next ``n``. Either is said.
4. Score both ONNX exports on the new validation split and decide (``gate``); the
   decision goes into the run directory as ``gate.json`` and ``gate.md`` (written once,
   by this job) before the registry hears of it.
5. Register the challenger and move the aliases (``registry``: champion last).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from search.config import ConfigError, RunConfig
from search.drivers import is_finished, live_driver, read_drivers
from search.layout import CONFIG, EXPORT, GATE_JSON, GATE_MARKDOWN, SPACE, SPLIT, join
from search.retrain.gate import Decision, decide, describe, score_bundle
from search.retrain.registry import (
    ABANDONED, CHALLENGER, CHAMPION, DECISION, FINGERPRINT, REGISTERED, REGISTERING, RUN_DIR, STATE, Registry,
    Version, registry_uri,
)
from search.retrain.warm import history_trials, top_configurations
from search.storage import RunStore
from trainables.locations import is_uri
from trainables.datasets import prepare_split, read_split

# Test-only hook: the retrain stops (sleeps) at this stage, so a test can SIGKILL it there.
PAUSE_ENV = "TUNECV_TEST_RETRAIN_PAUSE_AT"


class RetrainBusyError(ConfigError):
    """Another retrain of the same model holds the lock."""


@contextmanager
def retrain_lock(lock_dir: Path, model_name: str) -> Iterator[None]:
    """An exclusive, non-blocking lock per model; the kernel drops it when the process
    dies, so a killed retrain never leaves a stale lock behind."""
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


def _pause(stage: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"paused at {stage} ({PAUSE_ENV})", flush=True)
        while True:
            time.sleep(3600)


def retrain(cfg: RunConfig, print_fn: Callable[[str], None] = print) -> Decision | None:
    """Run one retrain (module docstring); the gate's decision, or None when nothing was
    retrained because the snapshot had been seen.

    Raises:
        ConfigError: No ``retrain`` section, a registry the output directory cannot
            hold, or another retrain of the model is running; all before any compute.
    """
    if cfg.retrain is None:
        raise ConfigError("tunecv retrain needs a `retrain:` section in the run file (model_name, snapshot, "
                          "num_samples); see the README's \"Scheduled retraining\".")
    # Resolved once: a `latest` symlink that the data pipeline moves during a long
    # retrain must not change what its later trials read.
    section = cfg.retrain.model_copy(update={"snapshot": cfg.retrain.snapshot.resolve()})
    cfg = cfg.model_copy(update={"retrain": section})
    if is_uri(cfg.output_dir) and not (section.registry_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"retrain.registry_uri: output_dir {cfg.output_dir} is an object store, and the default "
                          "registry is an SQLite file in a local output_dir; set retrain.registry_uri or "
                          "MLFLOW_TRACKING_URI to an MLflow server.")
    local_out = None if is_uri(cfg.output_dir) else Path(cfg.output_dir)
    lock_dir = local_out or Path(tempfile.gettempdir())
    with retrain_lock(lock_dir, section.model_name):
        uri = registry_uri(section.registry_uri, cfg.output_dir)
        default = local_out is not None and uri == registry_uri(None, cfg.output_dir)
        registry = Registry(uri, section.model_name, local_out / "mlflow-artifacts" if default else None)
        return _retrain(cfg, registry, print_fn)


def _retrain(cfg: RunConfig, registry: Registry, print_fn) -> Decision | None:
    section = cfg.retrain
    snapshot = prepare_split(section.snapshot, manifest=cfg.data.manifest, val_fraction=cfg.data.val_fraction,
                             seed=cfg.optim.seed, strict=cfg.data.strict, max_pixels=cfg.data.max_image_pixels)
    fingerprint = snapshot.fingerprint()
    champion = registry.alias(CHAMPION)
    print_fn(f"snapshot {section.snapshot}: fingerprint {fingerprint[:12]}, {len(snapshot.train)} train / "
             f"{len(snapshot.val)} val images; champion: "
             + (f"version {champion.number} (fingerprint {champion.fingerprint[:12]})" if champion else "none yet"))
    if champion is not None and champion.fingerprint == fingerprint:
        print_fn(f"the champion (version {champion.number}) was trained on this snapshot; nothing to retrain")
        return None
    earlier = [v for v in registry.versions() if v.fingerprint == fingerprint]
    for version in earlier:
        if version.state == REGISTERING:
            print_fn(f"version {version.number} was left half-registered by a retrain that stopped; marking it "
                     f"{ABANDONED} and registering again")
            registry.mark(version, STATE, ABANDONED)
    decided = next((v for v in reversed(earlier) if v.state == REGISTERED), None)
    if decided is not None:
        return _finish_decided(registry, decided, champion, print_fn)

    store = _run_dir(cfg, fingerprint, print_fn)
    if not (store.exists(SPACE) and is_finished(read_drivers(store))):
        _search(cfg, store, champion, fingerprint, print_fn)
    decision = _gate(cfg, store, registry, champion, print_fn)
    _register(cfg, store, registry, decision, print_fn)
    return decision


def _finish_decided(registry: Registry, version: Version, champion: Version | None, print_fn) -> None:
    """A retrain of this snapshot already registered its candidate: finish what a crash
    may have left (the aliases) and stop."""
    promote = version.tags.get(DECISION) == "promote"
    print_fn(f"this snapshot was retrained before: version {version.number}, gate decision "
             f"{version.tags.get(DECISION)}; continuing from there, nothing is trained again")
    registry.point(CHALLENGER, version)
    if promote and (champion is None or champion.number != version.number):
        registry.point(CHAMPION, version)
        print_fn(f"champion -> version {version.number}")
    return None


def _run_dir(cfg: RunConfig, fingerprint: str, print_fn) -> RunStore:
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
                print_fn(f"the search on this snapshot finished before ({store}); continuing from its export")
            elif live_driver(drivers) is None:
                print_fn(f"continuing the interrupted search in {store}")
            return store
        print_fn(f"{store} never finished its set-up; starting over in the next attempt directory")
        n += 1


def _search(cfg: RunConfig, store: RunStore, champion: Version | None, fingerprint: str, print_fn) -> None:
    from search.run.driver import run_search

    section = cfg.retrain
    searched = cfg.model_copy(update={
        "name": f"{section.model_name}-retrain",
        "data": cfg.data.model_copy(update={"root": section.snapshot}),
        "search": cfg.search.model_copy(update={"export": True, **({
            "num_samples": section.num_samples, "time_budget_s": section.time_budget_s} if champion else {})}),
    })
    warm, history = None, []
    if champion is not None:
        previous = RunStore.at(champion.tags[RUN_DIR])
        if section.top_k:
            warm = top_configurations(previous, section.top_k)
            print_fn(f"warm start: the top {len(warm)} configuration(s) of the champion's run {previous} first")
        if section.history:
            history = history_trials(previous, champion.fingerprint)
    run_search(searched, print_fn=print_fn, run_dir=store.location, warm_points=warm, history=history)


@contextmanager
def _bundle(store: RunStore) -> Iterator[Path]:
    """The run's verified export as a local directory."""
    with store.local_files(EXPORT, store.list_names(EXPORT)) as local:
        yield local


def _gate(cfg: RunConfig, store: RunStore, registry: Registry, champion: Version | None, print_fn) -> Decision:
    if store.exists(GATE_JSON):  # decided before a crash: the same numbers, not new ones
        return Decision.from_json(store.read_text(GATE_JSON))
    if not store.exists(join(EXPORT, "model.onnx")):
        raise ConfigError(f"the search in {store} has no verified export (it failed the parity check or found "
                          "no checkpoint); nothing is registered and the champion stays. See its report.")
    split = read_split(store.uri(SPLIT))
    with _bundle(store) as bundle:
        challenger = score_bundle(bundle, split)
    champion_score = None
    if champion is not None:
        with tempfile.TemporaryDirectory(prefix="tunecv-champion-") as tmp:
            champion_score = score_bundle(registry.download(champion, Path(tmp)), split)
    section = cfg.retrain
    decision = decide(challenger, champion_score, section.min_gain, section.max_class_drop)
    store.write_text(GATE_MARKDOWN, describe(decision))
    store.write_text(GATE_JSON, decision.to_json())  # last: its presence means the gate is decided
    print_fn(describe(decision).rstrip())
    return decision


def _register(cfg: RunConfig, store: RunStore, registry: Registry, decision: Decision, print_fn) -> None:
    from search.results.ranking import rank
    from search.results.trials import load_run

    best = rank(load_run(store).trials)[0]
    split = read_split(store.uri(SPLIT))
    metrics = {"macro_f1": decision.challenger.macro_f1,
               **{f"f1.{c}": f1 for c, f1 in decision.challenger.per_class_f1.items()}}
    if decision.champion is not None:
        metrics["champion_macro_f1"] = decision.champion.macro_f1
    tags = {FINGERPRINT: split.fingerprint(), RUN_DIR: store.location, DECISION: "promote" if decision.promote
            else "refuse", "tunecv.trial": best.trial_id, "tunecv.snapshot": str(cfg.retrain.snapshot)}
    with _bundle(store) as bundle:
        version = registry.register(bundle, best.params, metrics, tags, pause=_pause)
    registry.point(CHALLENGER, version)
    _pause("aliases")
    if decision.promote:
        registry.point(CHAMPION, version)
    print_fn(f"registered {registry.name} version {version.number} ({registry.uri}); challenger -> "
             f"{version.number}; champion " + (f"-> {version.number}" if decision.promote else "stays"))
