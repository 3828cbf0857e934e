"""The search's status line: its counts and best, printed after each trial's end where
there is no terminal, and as rich's live line (in a real pseudo-terminal) where there is.
Tune's own ``Trial`` objects (stubs: no trainable behind them) feed it; the outcomes are
the recorder's (``TrialRecorder.listeners``)."""

import os
import pty
import select
import subprocess
import sys
import time

from ray.tune.experiment import Trial

from search.run.progress import SearchStatus
from search.run.recorder import COMPLETED, FAILED, STOPPED
from search.study import TRIAL_ID_KEY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trial(trial_id: str) -> Trial:
    trial = Trial("tunecv", config={TRIAL_ID_KEY: trial_id}, stub=True)
    trial.set_status(Trial.RUNNING)
    return trial


def test_without_a_terminal_each_trial_end_prints_the_status():
    lines = []
    status = SearchStatus(num_samples=4, time_budget_s=600, print_fn=lines.append)
    a, b, c = _trial("t0000"), _trial("t0001"), _trial("t0002")
    status.on_step_end(0, [a, b, c])
    assert "3 running" in status.line() and "no result yet" in status.line()
    status.on_trial_result(0, [], a, {"macro_f1": float("nan"), "epoch": 1})  # a NaN never is the best
    status.on_trial_result(0, [], b, {"macro_f1": 0.83, "epoch": 1})
    status.on_trial_result(0, [], a, {"macro_f1": 0.80, "epoch": 2})
    with status.shown():  # not a terminal: no live display
        status.ended("t0001", STOPPED, None)
        status.ended("t0000", COMPLETED, None)
        status.ended("t0002", FAILED, "RuntimeError: boom")
    assert len(lines) == 3 and all(line.startswith("status: trials ") for line in lines)
    assert lines[-1].startswith("status: trials 3/4 done (1 completed, 1 stopped early, 1 failed), 0 running")
    assert "best macro_f1 0.8300 (t0001)" in lines[-1] and "of 10:00" in lines[-1]


def _read_all(fd: int, deadline: float) -> bytes:
    output = b""
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    return output


def test_on_a_terminal_the_live_line_stays_below_the_printed_lines():
    script = (
        "from search.run.progress import SearchStatus\n"
        "s = SearchStatus(num_samples=2, time_budget_s=None)\n"
        "with s.shown():\n"
        "    print('[t0000] epoch 1/1 macro_f1 0.5000')\n"
        "    s.ended('t0000', 'completed', None)\n"
        "    import time; time.sleep(1.2)\n"
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=follower, stderr=follower, cwd=REPO,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": "200"})
    os.close(follower)
    try:
        output = _read_all(leader, time.time() + 60)
        assert proc.wait(timeout=30) == 0, output[-2000:]
    finally:
        proc.kill()
        os.close(leader)
    text = output.decode(errors="replace")
    assert "[t0000] epoch 1/1 macro_f1 0.5000" in text
    last = text.rsplit("[t0000] epoch", 1)[1]  # the live line is redrawn after the printed one
    assert "trials 1/2 done (1 completed, 0 stopped early, 0 failed)" in last
    assert "status:" not in text  # the plain form is for logs only
