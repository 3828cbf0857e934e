"""What a killed driver's local Ray leaves behind, ended.

A local Ray's processes share the fate of the process that started it: Ray kills GCS
and the raylet when that driver dies (a kernel death signal), and the workers follow
the raylet within about 2 s. Its two agents, ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent``, see the raylet gone but then report its death to the GCS,
which is gone too, with a 60 s timeout (``ray._private.process_watcher``, Ray 2.60):
after a SIGKILLed ``tunecv run`` they were still alive 60 s later.

So a local Ray started by tunecv (``search.ray_session.connect_ray``) gets this small
watcher, ``python -m search.ray_reaper RAYLET_PID``. It holds the read end of a pipe
whose write end only the driver has; when the driver ends, however it ends, the read
returns EOF. The watcher then waits ``GRACE_S`` for Ray's own shutdown and kills the
raylet's children it saw while the driver lived (each checked by pid and start time,
so a reused pid is never hit). It never touches a Ray that tunecv joined
(``RAY_ADDRESS``, a cluster). It imports only psutil, which Ray depends on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

GRACE_S = 2.0  # Ray's own shutdown: workers leave within ~1.5 s of the raylet
POLL_S = 1.0  # how often the raylet's children are listed while the driver lives


def start_reaper() -> subprocess.Popen | None:
    """Start the watcher of this process's local Ray (its raylet, a child of this
    process), or None when there is none to watch."""
    import psutil

    raylets = [p for p in psutil.Process().children() if _name(p) == "raylet"]
    if len(raylets) != 1:
        return None
    # Its own session: a Ctrl-C to the terminal's process group is for the driver, which
    # then shuts Ray down itself; the watcher only cleans up after that.
    return subprocess.Popen([sys.executable, "-m", "search.ray_reaper", str(raylets[0].pid)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _name(process) -> str:
    try:
        return process.name()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return ""


def watch(raylet_pid: int, driver_gone: threading.Event) -> None:
    """Until ``driver_gone`` is set, track the raylet's children; then, after
    ``GRACE_S``, kill those still alive."""
    import psutil

    try:
        raylet = psutil.Process(raylet_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while not driver_gone.wait(POLL_S):
        try:
            children = raylet.children()
        except psutil.NoSuchProcess:  # the raylet went first: what it had is known
            driver_gone.wait()
            break
        # Workers come and go over a long search: keep only the living.
        seen = {pid: p for pid, p in seen.items() if p.is_running()}
        for child in children:
            seen.setdefault(child.pid, child)
    time.sleep(GRACE_S)
    for process in seen.values():
        try:
            if process.is_running():  # the same process: psutil compares its start time
                process.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str]) -> int:
    raylet_pid = int(argv[0])
    driver_gone = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()  # returns only when every write end is closed: the driver ended
        driver_gone.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    watch(raylet_pid, driver_gone)
    return 0


if __name__ == "__main__":
    os.nice(5)  # a watcher, never in a trial's way
    sys.exit(main(sys.argv[1:]))
