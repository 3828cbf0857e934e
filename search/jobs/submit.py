"""``tunecv submit``: send a search to a Ray cluster as a job, and say where its results go.

The same as ``ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . --
python -m search.cli run --config ...``, through Ray's Job Submission client, with
the checks that save a cluster's time: the run file is validated here first (its data
paths only on the cluster), ``output_dir`` must be a path every node shares, and the
run directory is fixed before submitting, so the report and model locations can be
printed now. Resubmitting with the same ``--run-dir`` resumes that run.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import yaml

from search.config import ConfigError, load_config
from search.layout import EXPORT, REPORT_MARKDOWN, run_name
from trainables.data.locations import is_uri

DEFAULT_RUNTIME_ENV = Path("cluster/runtime_env.yaml")
_POLL_S = 2.0


def auth_headers() -> dict[str, str]:
    """Ray's token, sent explicitly: the client only adds it itself in token mode.

    Looked up as Ray does: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``. No token found means a cluster without token auth.
    """
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}

def build_entrypoint(config: Path, run_dir: str, overrides: list[str]) -> str:
    """The job's command: the real CLI, run from the uploaded working directory."""
    parts = ["python", "-m", "search.cli", "run", "--config", config.as_posix(), "--run-dir", run_dir]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)

def submit(
    config: str,
    address: str,
    overrides: list[str] = (),
    runtime_env: Path = DEFAULT_RUNTIME_ENV,
    run_dir: str | None = None,
    wait: bool = False,
    print_fn=print,
) -> int:
    """Validate, submit, print where results will appear; with ``wait``, follow to the end.

    Returns:
        0 when submitted (or, with ``wait``, when the job succeeded), else 1.

    Raises:
        ConfigError: The run file, the runtime env or ``output_dir`` would fail on
            the cluster.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    config_path = Path(config)
    cfg = load_config(config_path, list(overrides), check_paths=False)
    if config_path.is_absolute() or ".." in config_path.parts:
        raise ConfigError(
            f"--config '{config}' must be a relative path inside this directory: the job runs "
            "from the uploaded working directory, where only files under it exist."
        )
    if run_dir is None:
        if not (is_uri(cfg.output_dir) or Path(cfg.output_dir).is_absolute()):
            raise ConfigError(
                f"output_dir '{cfg.output_dir}' is relative: on the cluster it would land in Ray's "
                "temporary copy of the working directory and be deleted with it. Set it to a "
                "shared path such as /mnt/shared/runs or a bucket (--set output_dir=s3://bucket/runs)."
            )
        run_dir = f"{cfg.output_dir.rstrip('/')}/{run_name(cfg.name)}"
    env = _load_runtime_env(runtime_env)
    client = JobSubmissionClient(address, headers=auth_headers())
    job_id = client.submit_job(
        entrypoint=build_entrypoint(config_path, run_dir, list(overrides)),
        runtime_env=env,
        metadata={"tunecv_run_dir": run_dir, "tunecv_config": config_path.as_posix()},
    )
    print_fn(f"submitted job {job_id} to {address}")
    print_fn(f"follow:  ray job logs -f {job_id} --address {address}")
    print_fn(f"run directory: {run_dir}")
    print_fn(f"report:  {run_dir}/{REPORT_MARKDOWN} (also report.parquet; `tunecv report {run_dir}` any time)")
    print_fn(f"model:   {run_dir}/{EXPORT}/model.onnx")
    if not wait:
        return 0
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(_POLL_S)
    print_fn(client.get_job_logs(job_id)[-4000:])
    print_fn(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1

def _load_runtime_env(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"runtime env '{path}' does not exist; pass --runtime-env FILE.")
    env = yaml.safe_load(path.read_text()) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"runtime env '{path}' must be a mapping (working_dir, env_vars, ...).")
    return env
