"""Resume planning against a real Optuna study in a real run directory: every way a
driver can leave its trials when it dies."""

import optuna
import pytest
import yaml

from search.config import parse_config
from search.run.resume import INTERRUPTED_REASON, plan_resume
from search.run.scheduler import RunIdASHA
from search.storage import RunStore
from search.study import (
    CHECKPOINT, FAILURES, REASON, RESUME_FROM_KEY, TIMESTAMP, TRIAL_ID_KEY, epoch_key, open_study, run_trial_id,
)
from tests.conftest import small_run_config
from trainables.model.checkpoint import RESUMABLE_FILES

State = optuna.trial.TrialState
DIST = {"lr_head": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}


def _cfg(tmp_path, num_samples=8, **search):
    (tmp_path / "data").mkdir(exist_ok=True)
    raw = small_run_config(tmp_path / "data", tmp_path, optim={"epochs": 3},
                           search={"num_samples": num_samples, **search})
    return parse_config(raw)


@pytest.fixture
def run(tmp_path):
    store = RunStore.at(tmp_path / "run")
    return store, open_study(store, None)


_clock = iter(range(1000, 100000))


def _trial(store, study, epochs, *, scores=None, checkpoints=(), tell=None):
    """Ask for a trial and record ``epochs`` epochs as the driver would; Ray kept the
    checkpoints of the epochs in ``checkpoints``. Optionally tell how it ended."""
    trial = study.ask(DIST)
    trial_id = run_trial_id(trial)
    trial.set_user_attr(TRIAL_ID_KEY, trial_id)
    for epoch in range(1, epochs + 1):
        score = (scores or {}).get(epoch, 0.1 * epoch)
        rel = f"tune/001/{trial_id}/checkpoint_{epoch - 1:06d}"
        trial.report(score, step=epoch)
        record = {"epoch": epoch, "macro_f1": score, TIMESTAMP: next(_clock), CHECKPOINT: rel}
        trial.set_user_attr(epoch_key(epoch), record)
        if epoch in checkpoints:
            for name in RESUMABLE_FILES:
                store.write_text(f"{rel}/{name}", "{}")
    if tell is State.FAIL:
        trial.set_user_attr(REASON, "ValueError: boom")
    if tell is not None:
        study.tell(trial, tell) if not isinstance(tell, State) else study.tell(trial, state=tell)
    return trial_id


def _latest(study, trial_id):
    return [t for t in study.trials if run_trial_id(t) == trial_id][-1]


def test_plan_settles_continues_and_counts(run, tmp_path):
    store, handle = run
    study = handle.study
    done = _trial(store, study, 3, tell=0.3)
    pruned = _trial(store, study, 1, tell=State.PRUNED)
    failed = _trial(store, study, 1, tell=State.FAIL)
    all_epochs = _trial(store, study, 3, checkpoints={3})  # only the driver's tell was lost
    training = _trial(store, study, 2, checkpoints={2})  # mid-training: continues from epoch 2
    deleted = _trial(store, study, 2, checkpoints=())  # Ray no longer keeps its checkpoints
    plan = plan_resume(handle, store, _cfg(tmp_path), scheduler=None, spent_s=0.0)

    assert set(plan.finished) == {done, pruned, failed, all_epochs}
    assert set(plan.continuing) == {training, deleted}
    assert plan.num_samples == 8 - 4  # the two continuing trials and two new ones
    assert _latest(study, all_epochs).state == State.COMPLETE and _latest(study, all_epochs).value == pytest.approx(0.3)
    assert not study.get_trials(states=(State.RUNNING,))
    continued = _latest(study, training)
    assert continued.state == State.WAITING
    assert continued.user_attrs[RESUME_FROM_KEY] == f"tune/001/{training}/checkpoint_000001"
    assert continued.intermediate_values == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}
    assert continued.user_attrs[FAILURES] == [INTERRUPTED_REASON]
    assert continued.params == _latest(study, training).params == study.trials[4].params
    restarted = _latest(study, deleted)
    assert RESUME_FROM_KEY not in restarted.user_attrs and restarted.intermediate_values == {}
    # The interrupted attempts stay in the study as FAIL: the history of their ids.
    assert [t.state for t in study.trials if run_trial_id(t) == training] == [State.FAIL, State.WAITING]


def test_a_second_resume_keeps_queued_continuations_and_their_ids(run, tmp_path):
    store, handle = run
    training = _trial(store, handle.study, 1, checkpoints={1})
    first = plan_resume(handle, store, _cfg(tmp_path), scheduler=None, spent_s=0.0)
    assert first.continuing == (training,)
    # The resumed driver dies before asking for the continuation: it is still queued.
    second = plan_resume(handle, store, _cfg(tmp_path), scheduler=None, spent_s=0.0)
    assert second.continuing == (training,) and second.finished == ()
    assert len(handle.study.get_trials(states=(State.WAITING,))) == 1  # not queued twice


def test_asha_rebuilt_from_the_study_stops_what_the_dead_driver_would_have(run, tmp_path):
    store, handle = run
    cfg = _cfg(tmp_path, asha={"grace_period": 1, "reduction_factor": 2})
    leader = _trial(store, handle.study, 1, scores={1: 0.9}, checkpoints={1})
    laggard = _trial(store, handle.study, 1, scores={1: 0.1}, checkpoints={1})  # arrived after the leader
    scheduler = RunIdASHA(max_t=3, grace_period=1, reduction_factor=2)
    plan = plan_resume(handle, store, cfg, scheduler, spent_s=0.0)
    assert plan.continuing == (leader,) and plan.finished == (laggard,)
    assert _latest(handle.study, laggard).state == State.PRUNED
    assert scheduler.rungs()["1"] == {leader: pytest.approx(0.9), laggard: pytest.approx(0.1)}


def test_a_spent_time_budget_starts_nothing(run, tmp_path):
    store, handle = run
    plan = plan_resume(handle, store, _cfg(tmp_path, time_budget_s=100), scheduler=None, spent_s=120.0)
    assert plan.num_samples == 0 and plan.time_budget_s == pytest.approx(-20.0)


def test_a_trial_the_dead_driver_was_still_asking_for_is_not_a_trial_of_the_run(run, tmp_path):
    """The searcher sets a trial's id after its last parameter; a driver that dies in
    between leaves a RUNNING trial with some parameters and no id. It never ran: the
    resume closes it, counts it nowhere, and readers never see it (even mid-ask)."""
    from search.config import dump_config
    from search.layout import SPACE
    from search.results.trials import load_run

    store, handle = run
    cfg = _cfg(tmp_path, num_samples=3)
    store.write_text("config.yaml", dump_config(cfg))
    space = {"needs_pretrained": False, "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
             "lr_head": {"low": 1e-4, "high": 1e-1},
             "lr_base": {"ratio": {"low": 1, "high": 1}}, "losses": {"ce": {}}}
    store.write_text(SPACE, yaml.safe_dump(space))
    asked = handle.study.ask()
    asked.suggest_categorical("backbone", ["test_resnet"])  # ...and the driver dies here
    assert load_run(store).trials == ()  # a reader in the middle of the ask sees nothing yet
    plan = plan_resume(handle, store, cfg, scheduler=None, spent_s=0.0)
    assert plan.finished == () and plan.continuing == () and plan.num_samples == 3
    assert handle.study.trials[0].state == State.FAIL
