"""Resume planning against a real Optuna study: every way a driver can die mid-search."""

import json

import optuna
import pytest

from search.config import parse_config
from search.records import COMPLETED, FAILED, INTERRUPTED, RUNNING, STOPPED_EARLY, TrialRecord, read_records, write_record
from search.resume import plan_resume
from search.searcher import TRIAL_ID_KEY
from tests.conftest import small_run_config

PARAMS = {"lr_head": 1e-3}
DIST = {"lr_head": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}


def _cfg(tmp_path, num_samples=6, **search):
    (tmp_path / "data").mkdir(exist_ok=True)
    raw = small_run_config(tmp_path / "data", tmp_path, optim={"epochs": 3}, search={"num_samples": num_samples, **search})
    return parse_config(raw)


def _trial(run_dir, study, status, epochs, *, tell=None, trial_id=None):
    """Ask the study for a trial, give it a record and epochs; optionally tell it."""
    t = study.ask(DIST)
    trial_id = trial_id or f"t{t.number:04d}"
    write_record(run_dir, TrialRecord(trial_id, PARAMS, {}, max_epochs=3, status=status))
    lines = [{"epoch": e, "macro_f1": 0.1 * e} for e in range(1, epochs + 1)]
    (run_dir / "trials" / trial_id / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if tell is not None:
        study.tell(t, tell) if not isinstance(tell, optuna.trial.TrialState) else study.tell(t, state=tell)
    return trial_id


def test_plan_settles_continues_and_counts(tmp_path):
    run_dir = tmp_path / "run"
    study = optuna.create_study(direction="maximize")
    State = optuna.trial.TrialState
    done = _trial(run_dir, study, COMPLETED, 3, tell=0.3)  # fully recorded
    untold = _trial(run_dir, study, STOPPED_EARLY, 1)  # finished, the tell() never came
    all_epochs = _trial(run_dir, study, RUNNING, 3)  # every epoch done, record not settled
    training = _trial(run_dir, study, RUNNING, 1)  # mid-training: continues
    retrying = _trial(run_dir, study, FAILED, 1)  # crashed, Tune was about to retry it
    told_first = _trial(run_dir, study, RUNNING, 2, tell=0.2)  # Optuna told, callbacks never ran
    plan = plan_resume(run_dir, _cfg(tmp_path, num_samples=8), study)

    assert set(plan.finished) == {done, untold, all_epochs, told_first}
    assert set(plan.continuing) == {training, retrying}
    assert plan.num_samples == 8 - 4  # the continuing trials and two new ones
    records = {r.trial_id: r.status for r in read_records(run_dir)}
    assert records[all_epochs] == COMPLETED and records[told_first] == STOPPED_EARLY
    assert records[training] == INTERRUPTED and records[retrying] == INTERRUPTED
    assert not study.get_trials(states=(State.RUNNING,))
    queued = study.get_trials(states=(State.WAITING,))
    assert sorted(t.user_attrs[TRIAL_ID_KEY] for t in queued) == sorted([training, retrying])
    assert plan.history[training] == []  # no last/ checkpoint: it starts over, its epoch 1 is not kept
    assert plan.history[done] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]


def test_a_second_resume_keeps_queued_continuations_and_their_ids(tmp_path):
    run_dir = tmp_path / "run"
    study = optuna.create_study(direction="maximize")
    training = _trial(run_dir, study, RUNNING, 1)
    first = plan_resume(run_dir, _cfg(tmp_path), study)
    assert first.continuing == (training,)
    # The resumed driver dies before asking for the continuation: it is still queued.
    second = plan_resume(run_dir, _cfg(tmp_path), study)
    assert second.continuing == (training,) and second.finished == ()
    assert {r.trial_id: r.status for r in read_records(run_dir)}[training] == INTERRUPTED
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1  # not enqueued twice


def test_a_spent_time_budget_starts_nothing(tmp_path):
    from search.records import write_state

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_state(run_dir, status="running", spent_s=120.0)
    plan = plan_resume(run_dir, _cfg(tmp_path, time_budget_s=100), optuna.create_study(direction="maximize"))
    assert plan.num_samples == 0
