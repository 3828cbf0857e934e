"""The errors that end a trial for good. Tune retries every trial error up to
``search.max_failures`` from the last checkpoint, which is right for a crash (a killed
process, a lost node, an OOM kill) and wasted for an error every attempt raises again.
Ray's ``FailureConfig`` has no per-exception policy, so the class says which is which:
``FinalTrialError`` is never retried; anything else is treated as a crash.
"""

from __future__ import annotations

from collections.abc import Iterator


class FinalTrialError(Exception):
    """An error a retry from the last checkpoint cannot fix; the trial fails at once."""


class TrialConfigError(FinalTrialError, ValueError):
    """The trial's configuration cannot train on this data (a batch larger than the
    training set, an invalid combination of searched values)."""


class TrialTimeoutError(FinalTrialError, TimeoutError):
    """The trial ran past ``search.trial_timeout_s`` (a hung step, a stalled worker)."""


def nested_errors(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and every exception behind it: its cause and context chain, a Ray task's
    ``cause``, Ray Train's ``ControllerError.controller_failure`` and
    ``WorkerGroupError.worker_failures`` (a pickled Ray exception keeps no ``__cause__``)."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None),
                    getattr(current, "controller_failure", None),
                    *(getattr(current, "worker_failures", None) or {}).values()]
