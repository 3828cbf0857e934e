"""Every MLflow call of a retrain: the registered model, its versions and two aliases.

A candidate is an MLflow run (its metrics, parameters, data fingerprint and the search's
run directory, with the verified ONNX bundle as the artifact ``model``) registered as a
model version. Aliases, not stages (deprecated since MLflow 2.9): ``challenger`` is the
latest candidate, ``champion`` the one serving.

Crash safety comes from the order of writes. A version is created tagged
``tunecv.state=registering``; only once its run, artifacts and gate numbers are all in
place does the tag become ``registered``, and only then do the aliases move, champion
last. A retrain killed at any moment therefore leaves ``champion`` where it was, and a
version still ``registering`` is recognisably half-made: the next retrain marks it
``abandoned`` and registers again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.config import ConfigError

CHAMPION, CHALLENGER = "champion", "challenger"
STATE, REGISTERING, REGISTERED, ABANDONED = "tunecv.state", "registering", "registered", "abandoned"
FINGERPRINT, RUN_DIR, DECISION = "tunecv.data_fingerprint", "tunecv.run_dir", "tunecv.decision"
GATED_AGAINST = "tunecv.gated_against"  # the champion version the gate compared with ("none": no champion)
TRIAL, SNAPSHOT = "tunecv.trial", "tunecv.snapshot"
ARTIFACT_PATH = "model"
# What MLflow answers for a model or alias that does not exist yet (its SQL store says
# INVALID_PARAMETER_VALUE for an unknown alias); anything else, such as a registry that
# cannot be reached, must not read as "no champion".
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
# How long the first request may take. MLflow's own default retries an unreachable server
# for about 4 minutes (7 retries, backoff 2) before a traceback: a scheduled retrain
# should say at once, before any training, that it cannot reach its registry.
REACH_TIMEOUT_S = 8


class RegistryUnreachable(ConfigError):
    """The registry's first request failed: the message names the URI and what to fix
    (a ``ConfigError``: the URI is the run's input, and the CLI prints it as one line)."""


def registry_uri(configured: str | None, output_dir: str) -> str:
    """``retrain.registry_uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under ``output_dir``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


@dataclass(frozen=True)
class Version:
    """One registered model version, as a retrain reads it."""

    number: str
    tags: dict[str, str]
    source: str
    run_id: str

    @property
    def state(self) -> str:
        return self.tags.get(STATE, "")

    @property
    def fingerprint(self) -> str:
        return self.tags.get(FINGERPRINT, "")


class Registry:
    """The registered model ``name`` at ``uri`` (any MLflow tracking URI)."""

    def __init__(self, uri: str, name: str, artifact_root: Path | None = None) -> None:
        # A quiet console: tunecv prints what a retrain did in its own lines. MLflow's INFO
        # logs ("Creating initial MLflow database tables...", alembic's migrations) and its
        # tqdm "Downloading artifacts" bars said nothing a user acts on. A user's own
        # setting of the bar wins.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        for logger in ("mlflow", "alembic"):
            logging.getLogger(logger).setLevel(logging.WARNING)

        self.uri, self.name = uri, name
        try:
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        except Exception as err:  # noqa: BLE001 - an unknown URI scheme fails here
            raise self._unusable(err) from None
        # An embedded (SQLite) registry keeps artifacts next to it; a server decides itself.
        self.artifact_root = artifact_root

    def check_reachable(self) -> None:
        """One request, no retries, within ``REACH_TIMEOUT_S``: the registry answers as an
        MLflow registry, or this raises :class:`RegistryUnreachable` naming the URI.
        (An unknown URI scheme must not pass for "no champion yet" later: MLflow says
        INVALID_PARAMETER_VALUE for it, as for an alias that does not exist.)"""
        try:
            with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(REACH_TIMEOUT_S)):
                self.client.search_registered_models(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure here means the same to a user
            raise self._unusable(err) from None

    def _unusable(self, err: Exception) -> RegistryUnreachable:
        reason = " ".join(str(err).split())
        if "(Caused by " in reason:  # requests' innermost cause says it: refused, timed out, no such host
            reason = reason[reason.index("(Caused by ") + len("(Caused by "):].rstrip(")")
        if len(reason) > 300:
            reason = reason[:300] + "..."
        return RegistryUnreachable(
            f"cannot use the MLflow registry at {self.uri} (retrain.registry_uri, else MLFLOW_TRACKING_URI): "
            f"{type(err).__name__}: {reason}. Start the tracking server or fix the URI; nothing was trained.")

    def _version(self, mv) -> Version:
        return Version(str(mv.version), dict(mv.tags or {}), mv.source, mv.run_id)

    def alias(self, alias: str) -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as err:
            if err.error_code in _ABSENT:  # no such model, or no such alias yet
                return None
            raise

    def versions(self) -> list[Version]:
        """Every version of the model, oldest first."""
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted((self._version(mv) for mv in found), key=lambda v: int(v.number))

    def download(self, version: Version, dst: Path) -> Path:
        """The version's ONNX bundle, copied into ``dst``."""
        import mlflow

        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=ARTIFACT_PATH,
                                                    dst_path=str(dst), tracking_uri=self.uri)
        return Path(local)

    def mark(self, version: Version, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, version.number, key, value)

    def _experiment_id(self) -> str:
        experiment_name = f"tunecv-{self.name}"
        found = self.client.get_experiment_by_name(experiment_name)
        if found is not None:
            return found.experiment_id
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        return self.client.create_experiment(experiment_name, artifact_location=location)

    def register(self, bundle: Path, params: dict[str, Any], metrics: dict[str, float],
                 tags: dict[str, str]) -> Version:
        """Log a candidate run with ``bundle`` as its model and register it, tagged
        ``registering`` until everything is written; returns the registered version."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        client = self.client
        run = client.create_run(self._experiment_id(), tags={"mlflow.runName": f"{self.name}-candidate"})
        run_id = run.info.run_id
        now = int(run.info.start_time)
        client.log_batch(
            run_id,
            metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        client.log_artifacts(run_id, str(bundle), ARTIFACT_PATH)
        client.set_terminated(run_id)
        try:
            client.create_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # every retrain after the first
                raise
        mv = client.create_model_version(self.name, f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id,
                                         tags={**tags, STATE: REGISTERING})
        version = self._version(mv)
        self.mark(version, STATE, REGISTERED)
        return Version(version.number, {**version.tags, STATE: REGISTERED}, version.source, run_id)

    def point(self, alias: str, version: Version) -> None:
        self.client.set_registered_model_alias(self.name, alias, version.number)


def metric_key(name: str) -> str:
    """An MLflow metric name for ``name`` (class names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


@contextlib.contextmanager
def _environ(**values: str):
    """``os.environ`` with ``values`` set for the block (MLflow reads its HTTP settings
    from the environment at each request), then as it was."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
