"""Which run a ``tunecv run`` works on, and whether it may take it over: ``--run-dir``
when given (resumed if it holds a run), else the newest unfinished ``<name>-<start time>``
under ``output_dir`` whose driver is gone and whose config is the same, else a new run.
"""

from __future__ import annotations

from pathlib import Path

from search.config import ConfigError, RunConfig
from search.drivers import DriverState, is_finished, live_driver, read_drivers
from search.layout import CONFIG, CONFIG_DIGEST, DRIVERS, REPORT_MARKDOWN, SPACE, is_run_of, run_name
from search.storage import RunStore, config_digest, read_config


def locate_run(cfg: RunConfig, run_dir: str | None) -> tuple[RunStore, bool]:
    """Where this search's run lives, and whether it is an earlier run to resume.

    Raises:
        ConfigError: ``run_dir`` exists but holds no run.
    """
    if run_dir is not None:
        store = RunStore.at(run_dir)
        if store.exists(CONFIG):
            return store, True
        if store.is_local and store.exists() and store.list_names():
            raise ConfigError(f"--run-dir '{run_dir}' exists but is not a tunecv run directory; pick another.")
        return store, False
    root = RunStore.at(cfg.output_dir)
    for name in reversed(root.list_names()):  # names end in the start time: newest first
        run = root.child(name)
        if is_run_of(name, cfg.name) and run.exists(SPACE):  # written last when a run is set up
            drivers = read_drivers(run)
            if not is_finished(drivers) and live_driver(drivers) is None:
                return run, True
    return new_run(cfg), False


def new_run(cfg: RunConfig) -> RunStore:
    """``output_dir/<name>-YYYYmmdd-HHMMSS``, not yet taken."""
    root, name = RunStore.at(cfg.output_dir), run_name(cfg.name)
    store, suffix = root.child(name), 1
    while store.exists():  # two runs started in the same second must not share a directory
        store, suffix = root.child(f"{name}-{suffix}"), suffix + 1
    return store


def require_search_run(store: RunStore) -> list[DriverState]:
    """The run's drivers; a directory without any (a `tunecv train` one) is refused.

    Raises:
        ConfigError: Naming the directory and how a search starts instead.
    """
    drivers = read_drivers(store)
    if not drivers and not store.exists(CONFIG):
        raise ConfigError(f"'{store}' is not a tunecv run directory: expected one holding {CONFIG} and {SPACE}, "
                          f"as `tunecv run` makes under output_dir, but found {_contents(store)}. Give a run "
                          "directory (output_dir/<name>-<start time>).")
    if not drivers:
        raise ConfigError(
            f"'{store}' is not a search run: it has no {DRIVERS}/ (a `tunecv train` directory, or a run whose "
            f"driver stopped before it began). A search starts with `tunecv run --config {store.uri(CONFIG)}`."
        )
    return drivers


def _contents(store: RunStore) -> str:
    """What ``store`` holds, in a few words: for a message about what was found instead."""
    if not store.exists():
        return "nothing (it does not exist)"
    if store.is_local and not Path(store.location).is_dir():
        return "a file"
    names = store.list_names()
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} entries: {shown}" if names else "an empty directory"


def check_resumable(store: RunStore, cfg: RunConfig) -> None:
    """Refuse to take over a finished run, a run another driver still searches, a run
    whose ``config.yaml`` was edited since it started, or a run that was started with other
    settings (its trials would not be comparable).

    Raises:
        ConfigError: Saying which, and what to do instead.
    """
    drivers = require_search_run(store)
    if not store.exists(SPACE):
        raise ConfigError(
            f"run '{store}' never finished its set-up (no {SPACE}: its first driver stopped while "
            "scanning the data); nothing to resume. Start a new run (another --run-dir, or none)."
        )
    if is_finished(drivers):
        raise ConfigError(
            f"run '{store}' is finished; its report is {store.uri(REPORT_MARKDOWN)}. Start a new run "
            "(run the same config again without --run-dir/--resume, or --set name=...)."
        )
    live = live_driver(drivers)
    if live is not None:
        raise ConfigError(
            f"run '{store}' is still being searched by pid {live.pid} on {live.hostname}; stop that "
            "driver first (a driver on another host counts as dead once its heartbeat is a minute old)."
        )
    _check_config_unedited(store)
    diffs = _differences(read_config(store).model_dump(mode="json"), cfg.model_dump(mode="json"))
    if diffs:
        raise ConfigError(
            f"run '{store}' was started with another config; resuming would mix trials that are "
            f"not comparable. Differences: {', '.join(diffs)}. Resume it with `tunecv run --resume "
            f"{store}` (its own config), or start a new run with another name (--set name=...)."
        )


def _check_config_unedited(store: RunStore) -> None:
    """Refuse a run whose ``config.yaml`` differs from the digest its first driver wrote:
    a resume reads its settings from that file, so an edit would search on with values
    the earlier trials never had. A run from before digests were written has none."""
    if not store.exists(CONFIG_DIGEST):
        return
    recorded, now = store.read_text(CONFIG_DIGEST).strip(), config_digest(store.read_text(CONFIG))
    if now != recorded:
        raise ConfigError(
            f"run '{store}': {store.uri(CONFIG)} was edited after the run started (sha256 {now[:12]}..., but "
            f"{CONFIG_DIGEST} recorded {recorded[:12]}... at its start), so its trials did not run with these "
            f"values. Restore the file as it was, or start a new run with the edited settings "
            f"(`tunecv run --config {store.uri(CONFIG)} --set name=NEW_NAME`)."
        )


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key} ({va!r} -> {vb!r})")
    return out
