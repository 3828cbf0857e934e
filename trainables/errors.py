"""The errors that end a trial for good. Tune retries every trial error up to
``search.max_failures`` from the last checkpoint, which is right for a crash (a killed
process, a lost node, an OOM kill) and wasted for an error every attempt raises again.
Ray's ``FailureConfig`` has no per-exception policy, so the class says which is which:
``FinalTrialError`` is never retried; anything else is treated as a crash.
"""

from __future__ import annotations


class FinalTrialError(Exception):
    """An error a retry from the last checkpoint cannot fix; the trial fails at once."""


class TrialConfigError(FinalTrialError, ValueError):
    """The trial's configuration cannot train on this data (a batch larger than the
    training set, an invalid combination of searched values)."""


class TrialTimeoutError(FinalTrialError, TimeoutError):
    """The trial ran past ``search.trial_timeout_s`` (a hung step, a stalled worker)."""
