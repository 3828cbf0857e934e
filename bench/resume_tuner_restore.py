"""What ``Tuner.restore`` keeps of the resume promises tunecv makes, measured on a toy search.

A toy trainable (4 epochs of 1 s, a checkpoint per epoch, no torch) runs under the
same Tune setup as a search: Optuna TPE with its study in a journal file, ASHA, 2
concurrent trials, retries, a time budget. The driver is SIGKILLed once a trial has
finished and another is mid-training (as in tunecv's killed-driver test), and the
experiment is continued with ``Tuner.restore(resume_unfinished=True,
resume_errored=True)``. The trainable logs every epoch it trains to a side file, so
re-run epochs are visible. Written to ``bench/results/resume_tuner_restore.json``;
tunecv's own resume is measured by the killed-driver test (``tests/stress/``).

    .venv/bin/python bench/resume_tuner_restore.py [--runs 3]
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_SAMPLES, EPOCHS, BUDGET_S = 8, 4, 60.0


def toy(config: dict) -> None:
    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"]
    log = Path(config["log"])
    for epoch in range(start + 1, EPOCHS + 1):
        time.sleep(1.0)
        with log.open("a") as f:
            f.write(json.dumps({"trial": tune.get_context().get_trial_id(), "epoch": epoch, "t": time.time()}) + "\n")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
            score = config["x"] * epoch / EPOCHS
            tune.report({"epoch": epoch, "score": score}, checkpoint=tune.Checkpoint.from_directory(d))


def _tuner(work: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    storage = JournalStorage(JournalFileBackend(str(work / "optuna.journal")))
    searcher = OptunaSearch(metric="score", mode="max", storage=storage, study_name="toy",
                            sampler=optuna.samplers.TPESampler(seed=0))
    return tune.Tuner(
        tune.with_resources(toy, {"cpu": 1}),
        param_space={"x": tune.uniform(0, 1), "log": str(work / "epochs.jsonl")},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=NUM_SAMPLES, max_concurrent_trials=2,
                                    time_budget_s=BUDGET_S,
                                    scheduler=ASHAScheduler(metric="score", mode="max", max_t=EPOCHS,
                                                            grace_period=1, time_attr="epoch")),
        run_config=tune.RunConfig(name="toy", storage_path=str(work), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def first_driver(work: Path) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    _tuner(work).fit()


def restore(work: Path) -> dict:
    import ray
    import ray.cloudpickle
    from ray import tune

    loads = {"n": 0}
    for module in (pickle, ray.cloudpickle):
        for name in ("load", "loads"):
            original = getattr(module, name)

            def counted(*args, _original=original, **kwargs):
                loads["n"] += 1
                return _original(*args, **kwargs)

            setattr(module, name, counted)
    ray.init(num_cpus=2, include_dashboard=False)
    tuner = tune.Tuner.restore(str(work / "toy"), trainable=tune.with_resources(toy, {"cpu": 1}),
                               resume_unfinished=True, resume_errored=True)
    print(json.dumps({"unpickle_calls_during_restore": loads["n"]}), flush=True)  # before fit can fail
    started = time.time()
    grid = tuner.fit()
    return {"second_driver_s": round(time.time() - started, 1), "trials_after": len(grid)}


def _one_done_one_mid(log: Path) -> bool:
    epochs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = [i for i, e in enumerate(epochs) if e["epoch"] == EPOCHS]
    return bool(done) and any(e["epoch"] < EPOCHS for e in epochs[done[0] + 1:])


def measure() -> dict:
    work = Path(tempfile.mkdtemp(prefix="tunecv-restore-"))
    env = {**os.environ, "RAY_AIR_NEW_OUTPUT": "0"}
    log = work / "epochs.jsonl"
    started = time.time()
    first = subprocess.Popen([sys.executable, __file__, "first", str(work)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not _one_done_one_mid(log) and first.poll() is None:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_after = round(time.time() - started, 1)
    time.sleep(2)
    before = [json.loads(line) for line in log.read_text().splitlines()]
    killed_at = time.time()
    out = subprocess.run([sys.executable, __file__, "restore", str(work)], env=env, capture_output=True,
                         text=True, timeout=600)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    measured = {k: v for line in lines for k, v in line.items()}
    if out.returncode != 0:  # the restored search itself failed: keep its last exception line
        errors = [line for line in out.stderr.splitlines() if "Error:" in line or "Exception:" in line]
        measured["restore_failed"] = errors[-1].strip() if errors else out.stderr[-500:]
    after = [e for e in (json.loads(line) for line in log.read_text().splitlines()) if e["t"] > killed_at]
    done_before = {e["trial"] for e in before if e["epoch"] == EPOCHS}
    seen = {}
    for e in before + after:
        seen.setdefault((e["trial"], e["epoch"]), []).append(e)
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="toy", storage=JournalStorage(JournalFileBackend(str(work / "optuna.journal"))))
    result = {
        "what": "Tuner.restore after a SIGKILLed driver, against tunecv's resume promises",
        "setup": f"{NUM_SAMPLES} trials x {EPOCHS} epochs of 1 s, 2 concurrent, OptunaSearch (journal), ASHA, "
                 f"time_budget_s {BUDGET_S}",
        "driver_killed_after_s": killed_after,
        **measured,
        "trials_started_before_kill": len({e["trial"] for e in before}),
        "trials_finished_before_kill": len(done_before),
        "finished_trials_rerun": len({e["trial"] for e in after if e["trial"] in done_before}),
        "epochs_trained_twice": sum(len(v) > 1 for v in seen.values()),
        "study_trials": len(study.trials),
        "study_trials_by_state": {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState},
    }
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = [measure() for _ in range(parser.parse_args().runs)]
    path = Path(__file__).resolve().parent / "results" / "resume_tuner_restore.json"
    path.write_text(json.dumps({"what": runs[0]["what"], "setup": runs[0]["setup"], "runs": runs}, indent=1) + "\n")
    for run in runs:
        print({k: v for k, v in run.items() if k not in ("what", "setup")})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "first":
        first_driver(Path(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "restore":
        print(json.dumps(restore(Path(sys.argv[2]))))
    else:
        main()
