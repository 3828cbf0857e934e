"""The drivers of a run: the first ``tunecv run`` is driver 1, each resume the next.
Driver k alone writes its files, each once: ``drivers/<k>.json`` at its start, a
heartbeat ``drivers/<k>/beat-<n>.json`` every ``HEARTBEAT_S`` (deleting beat n-1 after
writing beat n) and ``drivers/<k>/end.json`` at its end. From them a reader knows
whether the run is finished, searched right now or resumable, and how much of
``search.time_budget_s`` earlier drivers spent.

No file is rewritten because an object store cannot be read safely while it is: pyarrow
sizes an S3 object (HEAD) before it fetches it (ranged GETs), so a reader racing a
rewrite got the old length of the new text, a torn JSON (seen in CI).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace

from search.config import ConfigError
from search.layout import DRIVERS, driver_beat, driver_beats, driver_end, driver_start
from search.storage import RunStore

HEARTBEAT_S = 10.0  # how often a live driver writes a heartbeat
STALE_AFTER_S = 60.0  # a driver on another host that has been silent this long is dead
RUNNING, FINISHED, INTERRUPTED = "running", "finished", "interrupted"
# How long a driver on an object store waits between writing its claim and reading the
# others' (DriverRecord): longer than a claim's upload plus the clocks' skew.
CLAIM_SETTLE_S = 3.0


@dataclass(frozen=True)
class DriverState:
    """One driver's state: its start file, updated by its latest heartbeat or its end file."""

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
    return [_read_driver(store, DriverState(**store.read_json(f"{DRIVERS}/{name}"))) for name in names]


def _read_driver(store: RunStore, start: DriverState) -> DriverState:
    """``start`` as its end file, else its latest heartbeat, says it is now."""
    try:  # one read, not a check and a read: an ended driver is the common case
        return DriverState(**store.read_json(driver_end(start.k)))
    except FileNotFoundError:
        pass
    for _ in range(3):  # the beat listed may be deleted before it is read, when the next one lands
        beats = [n for n in store.list_names(driver_beats(start.k)) if n.startswith("beat-")]
        if not beats:
            return start
        try:
            return replace(start, **store.read_json(f"{driver_beats(start.k)}/{beats[-1]}"))
        except FileNotFoundError:
            continue
    return start


def live_driver(drivers: list[DriverState]) -> DriverState | None:
    """The driver searching the run right now, if any."""
    return drivers[-1] if drivers and drivers[-1].is_alive() else None


def is_finished(drivers: list[DriverState]) -> bool:
    return bool(drivers) and drivers[-1].status == FINISHED


def spent_s(drivers: list[DriverState]) -> float:
    """Search time all drivers spent: what ``time_budget_s`` is counted against."""
    return sum(d.spent_s for d in drivers)


class RunTakenError(ConfigError):
    """Another driver claimed the run at the same moment; it searches, this one stops."""


class DriverRecord:
    """This process as the run's next driver; it alone writes the files of driver ``k``.

    Two drivers started at one instant (two ``tunecv run --resume``) both find the run
    resumable and both want to be driver ``k``: the claim lets exactly one through, and
    the other raises ``RunTakenError`` naming it. On a filesystem the start file is
    created exclusively (``RunStore.create_exclusive``). An object store reached through
    pyarrow has no conditional write, so each contender writes a claim named by its clock
    (``drivers/<k>/claim-<ns>-<random>.json``), waits ``settle_s``, lists the claims,
    and the earliest wins. With strongly consistent listings (S3, GCS, Azure) every
    contender that lists after all claims landed sees the same earliest; one that listed
    before a later claim landed holds an earlier clock than it, so that later one loses.
    This holds while a claim's upload and the clocks' skew stay under ``settle_s``.
    """

    def __init__(self, store: RunStore, k: int, settle_s: float = CLAIM_SETTLE_S) -> None:
        self.store = store
        now = time.time()
        self.state = DriverState(
            k=k, status=RUNNING, pid=os.getpid(), hostname=socket.gethostname(),
            started=now, heartbeat=now, spent_s=0.0,
        )
        self.beats = 0
        self.ended = False
        self._claim(settle_s)

    def _claim(self, settle_s: float) -> None:
        k, start = self.state.k, json.dumps(asdict(self.state), indent=1) + "\n"
        if self.store.is_local:
            if not self.store.create_exclusive(driver_start(k), start.encode("utf-8")):
                self._taken(DriverState(**self.store.read_json(driver_start(k))))
            return
        mine = f"claim-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
        self.store.write_text(f"{driver_beats(k)}/{mine}", start)
        time.sleep(settle_s)
        claims = sorted(n for n in self.store.list_names(driver_beats(k)) if n.startswith("claim-"))
        if claims[0] != mine:
            self._taken(DriverState(**self.store.read_json(f"{driver_beats(k)}/{claims[0]}")))
        self.store.write_text(driver_start(k), start)

    def _taken(self, winner: DriverState) -> None:
        raise RunTakenError(
            f"run '{self.store}' was taken at the same moment by another driver, pid {winner.pid} on "
            f"{winner.hostname} ({driver_start(winner.k)}), which searches it now; nothing was changed. "
            "Wait for it to finish, or stop it and resume again."
        )

    def beat(self) -> None:
        """Write the next heartbeat, then delete the one before: one or two exist at a time."""
        self._tick()
        self.beats += 1
        self.store.write_json(driver_beat(self.state.k, self.beats),
                              {"heartbeat": self.state.heartbeat, "spent_s": self.state.spent_s})
        if self.beats > 1:
            try:
                self.store.delete(driver_beat(self.state.k, self.beats - 1))
            except OSError:  # a beat left behind is harmless: readers take the newest
                pass

    def finish(self, status: str, asha_rungs: dict | None = None) -> None:
        """``finished``, or ``interrupted`` (resumable: the next driver continues it).
        The first call writes the end file; a driver ends once."""
        if self.ended:
            return
        self._tick()
        self.state = replace(self.state, status=status, asha_rungs=asha_rungs)
        self.store.write_json(driver_end(self.state.k), asdict(self.state))
        self.ended = True

    def _tick(self) -> None:
        now = time.time()
        self.state = replace(self.state, heartbeat=now, spent_s=now - self.state.started)
