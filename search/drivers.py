"""The drivers of a run: the first ``tunecv run`` is driver 1, each resume the next.
Driver k alone writes ``drivers/<k>.json`` (at start, every ``HEARTBEAT_S``, at its end),
from which a reader knows whether the run is finished, searched right now or
resumable, and how much of ``search.time_budget_s`` earlier drivers spent.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, replace

from search.layout import DRIVERS, driver_state
from search.storage import RunStore

HEARTBEAT_S = 10.0  # how often a live driver rewrites its state file
STALE_AFTER_S = 60.0  # a driver on another host that has been silent this long is dead
RUNNING, FINISHED, INTERRUPTED = "running", "finished", "interrupted"


@dataclass(frozen=True)
class DriverState:
    """One driver's ``drivers/<k>.json``."""

    k: int
    status: str  # running | finished | interrupted
    pid: int
    hostname: str
    started: float
    heartbeat: float
    spent_s: float  # wall time this driver has spent searching
    asha_rungs: dict | None = None  # milestone -> {trial id: macro-F1}: what ASHA's stops were based on

    def is_alive(self) -> bool:
        """True while the driver works: by pid on its own host, else by heartbeat."""
        if self.status != RUNNING:
            return False
        if self.hostname != socket.gethostname():
            return time.time() - self.heartbeat < STALE_AFTER_S
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True


def read_drivers(store: RunStore) -> list[DriverState]:
    """Every driver the run has had, in order."""
    names = [n for n in store.list_names(DRIVERS) if n.endswith(".json")]
    return [DriverState(**store.read_json(f"{DRIVERS}/{name}")) for name in names]


def live_driver(drivers: list[DriverState]) -> DriverState | None:
    """The driver searching the run right now, if any."""
    return drivers[-1] if drivers and drivers[-1].is_alive() else None


def is_finished(drivers: list[DriverState]) -> bool:
    return bool(drivers) and drivers[-1].status == FINISHED


def spent_s(drivers: list[DriverState]) -> float:
    """Search time all drivers spent: what ``time_budget_s`` is counted against."""
    return sum(d.spent_s for d in drivers)


class DriverRecord:
    """This process as the run's next driver; it alone writes its ``drivers/<k>.json``."""

    def __init__(self, store: RunStore, k: int) -> None:
        self.store = store
        now = time.time()
        self.state = DriverState(
            k=k, status=RUNNING, pid=os.getpid(), hostname=socket.gethostname(),
            started=now, heartbeat=now, spent_s=0.0,
        )
        self._write()

    def beat(self) -> None:
        now = time.time()
        self.state = replace(self.state, heartbeat=now, spent_s=now - self.state.started)
        self._write()

    def finish(self, status: str, asha_rungs: dict | None = None) -> None:
        """``finished``, or ``interrupted`` (resumable: the next driver continues it)."""
        self.state = replace(self.state, status=status, asha_rungs=asha_rungs)
        self.beat()

    def _write(self) -> None:
        self.store.write_json(driver_state(self.state.k), asdict(self.state))
