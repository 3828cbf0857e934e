"""What ``Tuner.restore`` keeps of the resume promises tunecv makes, measured on a toy search.

A toy trainable (4 epochs of 1 s, a checkpoint per epoch, no torch) runs under the
same Tune setup as a search: Optuna TPE with its study in a journal file, ASHA, 2
concurrent trials, retries, a time budget. The driver is SIGKILLed once a trial has
finished and another is mid-training (as in tunecv's killed-driver test), and the
experiment is continued with ``Tuner.restore(resume_unfinished=True,
resume_errored=True)``. The trainable logs every epoch it trains to a side file, so
re-run epochs are visible. Written to ``bench/results/resume_tuner_restore.json``;
tunecv's own resume is measured by the killed-driver test (``tests/stress/``).

A run that could not measure (the first driver ended before the kill point, or the
restore printed nothing) raises ``BenchError`` and writes no result.

    .venv/bin/python -m bench.resume_tuner_restore [--runs 3]
    .venv/bin/python -m bench.resume_tuner_restore --smoke --results DIR   # 1 run, 3 x 2 short epochs (tests)
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

BUDGET_S = 60.0
# Tune's time budget bounds the restored search; a restoring driver still running at
# this point has hung (once in CI, 600 s with its result line printed): it dumps its
# threads' stacks a little before, and the run records where it stood.
RESTORE_TIMEOUT_S, STACKS_BEFORE_S = 4 * BUDGET_S, 15.0
# (trials, epochs, seconds an epoch): the measurement, and the smoke run's
FULL, SMOKE = (8, 4, 1.0), (3, 2, 0.3)


def toy(config: dict) -> None:
    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"]
    log, epochs = Path(config["log"]), config["epochs"]
    for epoch in range(start + 1, epochs + 1):
        time.sleep(config["epoch_s"])
        with log.open("a") as f:
            f.write(json.dumps({"trial": tune.get_context().get_trial_id(), "epoch": epoch, "t": time.time()}) + "\n")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
            score = config["x"] * epoch / epochs
            tune.report({"epoch": epoch, "score": score}, checkpoint=tune.Checkpoint.from_directory(d))


def _tuner(work: Path, samples: int, epochs: int, epoch_s: float):
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
        param_space={"x": tune.uniform(0, 1), "log": str(work / "epochs.jsonl"), "epochs": epochs, "epoch_s": epoch_s},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=samples, max_concurrent_trials=2,
                                    time_budget_s=BUDGET_S,
                                    scheduler=ASHAScheduler(metric="score", mode="max", max_t=epochs,
                                                            grace_period=1, time_attr="epoch")),
        run_config=tune.RunConfig(name="toy", storage_path=str(work), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def _init_ray() -> None:
    """Join the Ray at ``RAY_ADDRESS`` (``--address``), or start a local one."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=2, include_dashboard=False)


def first_driver(work: Path, samples: int, epochs: int, epoch_s: float) -> None:
    _init_ray()
    _tuner(work, samples, epochs, epoch_s).fit()


def restore(work: Path) -> dict:
    import faulthandler

    import ray
    import ray.cloudpickle
    from ray import tune

    faulthandler.dump_traceback_later(RESTORE_TIMEOUT_S - STACKS_BEFORE_S)
    loads = {"n": 0}
    for module in (pickle, ray.cloudpickle):
        for name in ("load", "loads"):
            original = getattr(module, name)

            def counted(*args, _original=original, **kwargs):
                loads["n"] += 1
                return _original(*args, **kwargs)

            setattr(module, name, counted)
    _init_ray()
    tuner = tune.Tuner.restore(str(work / "toy"), trainable=tune.with_resources(toy, {"cpu": 1}),
                               resume_unfinished=True, resume_errored=True)
    print(json.dumps({"unpickle_calls_during_restore": loads["n"]}), flush=True)  # before fit can fail
    started = time.time()
    grid = tuner.fit()
    return {"second_driver_s": round(time.time() - started, 1), "trials_after": len(grid)}


def _one_done_one_mid(log: Path, epochs: int) -> bool:
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = [i for i, e in enumerate(lines) if e["epoch"] == epochs]
    return bool(done) and any(e["epoch"] < epochs for e in lines[done[0] + 1:])


def measure(samples: int, epochs: int, epoch_s: float, address: str | None = None) -> dict:
    from bench._common import BenchError

    work = Path(tempfile.mkdtemp(prefix="tunecv-restore-"))
    env = {**os.environ, "RAY_AIR_NEW_OUTPUT": "0", **({"RAY_ADDRESS": address} if address else {})}
    log = work / "epochs.jsonl"
    started = time.time()
    first = subprocess.Popen([sys.executable, __file__, "first", str(work), str(samples), str(epochs), str(epoch_s)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not _one_done_one_mid(log, epochs) and first.poll() is None:
        time.sleep(0.1)
    if first.poll() is not None:
        raise BenchError(f"resume_tuner_restore: the first driver ended (exit {first.returncode}) before one "
                         "trial had finished and another was mid-training; nothing to restore")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_after = round(time.time() - started, 1)
    _wait_for_workers_gone(2 * epoch_s)
    before = [json.loads(line) for line in log.read_text().splitlines()]
    killed_at = time.time()
    stdout, stderr, returncode = _restore(work, env)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    measured = {k: v for line in lines for k, v in line.items()}
    if "unpickle_calls_during_restore" not in measured:
        raise BenchError(f"resume_tuner_restore: the restoring driver printed nothing (exit {returncode}): "
                         f"{stderr[-500:]}")
    if returncode is None:
        measured["restore_failed"] = (f"no exit after {RESTORE_TIMEOUT_S:.0f} s (time_budget_s {BUDGET_S:.0f}); "
                                      f"main thread in: {_main_thread_frames(stderr)}")
    elif returncode != 0:  # the restored search itself failed: keep its last exception line
        errors = [line for line in stderr.splitlines() if "Error:" in line or "Exception:" in line]
        measured["restore_failed"] = errors[-1].strip() if errors else stderr[-500:]
    after = [e for e in (json.loads(line) for line in log.read_text().splitlines()) if e["t"] > killed_at]
    done_before = {e["trial"] for e in before if e["epoch"] == epochs}
    seen = {}
    for e in before + after:
        seen.setdefault((e["trial"], e["epoch"]), []).append(e)
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="toy", storage=JournalStorage(JournalFileBackend(str(work / "optuna.journal"))))
    result = {
        "what": "Tuner.restore after a SIGKILLed driver, against tunecv's resume promises",
        "setup": f"{samples} trials x {epochs} epochs of {epoch_s} s, 2 concurrent, OptunaSearch (journal), ASHA, "
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


def _wait_for_workers_gone(at_least_s: float, at_most_s: float = 60.0) -> None:
    """The killed driver's trial workers go down with it: let them. On a Ray this process
    has joined (the tests'), wait until their CPUs are free again, so the restore does not
    start against a cluster whose CPUs a dead driver still holds."""
    import ray

    time.sleep(at_least_s)
    deadline = time.time() + at_most_s
    while ray.is_initialized() and time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.2)


def _restore(work: Path, env: dict) -> tuple[str, str, int | None]:
    """The restoring driver's stdout, stderr and exit code; ``None`` when it had to be killed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "restore", str(work)], env=env, stdout=out, stderr=err,
                                text=True)
        try:
            returncode = proc.wait(timeout=RESTORE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), returncode


def _main_thread_frames(stderr: str, depth: int = 4) -> str:
    """The innermost frames of the main thread in faulthandler's dump, innermost first."""
    dump = stderr.split("Thread 0x")
    main = next((block for block in reversed(dump) if "most recent call first" in block), "")
    frames = [line.strip() for line in main.splitlines() if line.strip().startswith("File ")]
    return "; ".join(frames[:depth]) or "no stack dump"


def main(argv: list[str] | None = None) -> Path:
    import argparse

    from bench._common import RESULTS, write_result

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 run of 3 trials x 2 epochs of 0.3 s (tests)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where resume_tuner_restore.json goes")
    parser.add_argument("--address", help="both drivers join this Ray instead of starting their own (the tests "
                                          "share one: a Ray start is most of a smoke run)")
    args = parser.parse_args(argv)
    runs = [measure(*(SMOKE if args.smoke else FULL), address=args.address)
            for _ in range(1 if args.smoke else args.runs)]
    path = write_result("resume_tuner_restore", {"what": runs[0]["what"], "setup": runs[0]["setup"], "runs": runs},
                        args.results)
    for run in runs:
        print({k: v for k, v in run.items() if k not in ("what", "setup")})
    return path


if __name__ == "__main__":
    # The two drivers, each in its own process: `first WORK TRIALS EPOCHS EPOCH_S`, `restore WORK`.
    if len(sys.argv) > 5 and sys.argv[1] == "first":
        first_driver(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif len(sys.argv) > 2 and sys.argv[1] == "restore":
        print(json.dumps(restore(Path(sys.argv[2]))))
    else:
        main()
