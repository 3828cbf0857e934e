"""ASHA over epochs, keyed by run-level trial id, with rungs a resumed search refills.
Tune does not persist a scheduler's state; ``RunIdASHA.replay`` feeds the recorded
epochs back, in arrival order, through the scheduler's public ``on_trial_add`` and
``on_trial_result``, so cutoffs after a resume are the ones the dead driver would
have used.
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from search.study import TRIAL_ID_KEY
from trainables.training.metrics import RANKING_METRIC

EPOCH = "epoch"  # ASHA's time attribute


class _RunId:
    """A trial as ASHA sees it: keyed by its run-level id."""

    def __init__(self, trial_id: str, trial=None) -> None:
        self.trial_id = trial_id
        self._trial = trial

    def __getattr__(self, name: str):
        return getattr(self._trial, name)

    @staticmethod
    def of(trial) -> _RunId:
        return _RunId(trial.config[TRIAL_ID_KEY], trial)


class RunIdASHA(ASHAScheduler):
    """ASHA whose rungs are keyed by run-level trial id and can be refilled on resume.

    A trial's last epoch (``max_t``) is let through instead of stopped: the trial ends
    by itself right after it, and stopping it there would kill its actor while it
    winds down (a TorchTrainer mid-teardown, which leaks its workers' placement group
    unless Ray's State API is up). Rungs are unchanged: ASHA records nothing for a
    result it stops at ``max_t`` either.
    """

    def __init__(self, *, max_t: int, **kwargs) -> None:
        super().__init__(time_attr=EPOCH, metric=RANKING_METRIC, mode="max", max_t=max_t, **kwargs)
        self.max_epochs = max_t

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, _RunId.of(trial))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(EPOCH, 0) >= self.max_epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, _RunId.of(trial), result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, _RunId.of(trial), result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, _RunId.of(trial))

    def replay(self, history: list[tuple[str, int, float]]) -> dict[str, str]:
        """Feed earlier drivers' results back, in the order they arrived.

        Args:
            history: (trial id, epoch, macro-F1) in arrival order.

        Returns:
            Each trial's decision at its last replayed result (CONTINUE or STOP): a
            trial the interrupted driver would have stopped is not continued.
        """
        decisions: dict[str, str] = {}
        for trial_id, epoch, value in history:
            if trial_id not in decisions:
                super().on_trial_add(None, _RunId(trial_id))
            result = {EPOCH: epoch, RANKING_METRIC: value}
            if epoch >= self.max_epochs:  # the trial ended there: ASHA records it on completion
                super().on_trial_complete(None, _RunId(trial_id), result)
                decisions[trial_id] = TrialScheduler.CONTINUE
                continue
            decisions[trial_id] = super().on_trial_result(None, _RunId(trial_id), result)
        return decisions

    def rungs(self) -> dict[str, dict[str, float]]:
        """Milestone epoch -> {trial id: macro-F1 recorded there}, for the driver's record.

        Ray 2.60 has no public view of the rungs: this reads ``_brackets[0]._rungs`` (one
        bracket, ASHA's default), the only private read; mode "max" keeps the values' sign.
        """
        (bracket,) = self._brackets
        return {str(int(milestone)): dict(recorded) for milestone, recorded in sorted(bracket._rungs)}


def create_scheduler(cfg) -> RunIdASHA | None:
    """ASHA over epochs (``max_t = optim.epochs``), or None for FIFO."""
    if cfg.search.scheduler != "asha":
        return None
    return RunIdASHA(
        max_t=cfg.optim.epochs,
        grace_period=cfg.asha_grace_period,
        reduction_factor=cfg.search.asha.reduction_factor,
    )
