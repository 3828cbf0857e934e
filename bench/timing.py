"""How ``bench/throughput.py`` times a pass: a clock on each batch handover (median step
time) and, from /proc, the cores this process, its DataLoader workers and every other
process used meanwhile, so passes on a busy machine can be told apart and left out.
"""

from __future__ import annotations

import os
import statistics
import time
from itertools import islice


# ---- CPU accounting: how much of the machine other processes used during a pass ----

def _proc_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _tree_ticks(root_pid: int) -> int:
    """CPU ticks of ``root_pid`` and every live descendant (the DataLoader workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            total += _proc_ticks(pid)
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


def cpu_snapshot() -> tuple[int, int, int] | None:
    """Busy ticks of the machine, of this process tree, of this process; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:9]]
        busy = sum(values) - values[3] - values[4]  # all but idle and iowait
        return busy, _tree_ticks(os.getpid()), _proc_ticks(os.getpid())
    except OSError:
        return None


def cpu_usage(before, after, wall_s: float) -> dict:
    """Average cores used during a pass by this process, its children (the DataLoader
    workers) and every other process on the machine."""
    if before is None or after is None:
        return {}
    busy, tree, main = ((b - a) / os.sysconf("SC_CLK_TCK") / wall_s for a, b in zip(before, after))
    return {"main_cores": round(main, 2), "child_cores": round(tree - main, 3),
            "other_cores": round(max(0.0, busy - tree), 2)}


class StepClock:
    """Hands batches through unchanged (at most ``max_steps``, for ``--steps``) and
    notes when each one is handed over.

    A step's time is the gap between two handovers (data wait + compute), the last
    one ending with the pass. Their median shrugs off a burst of outside load that
    a whole-pass total on a shared machine cannot.
    """

    def __init__(self, batches, max_steps: int | None = None):
        self.batches, self.sampler, self.marks = batches, getattr(batches, "sampler", None), []
        self.max_steps = max_steps or len(batches)

    def __len__(self) -> int:
        return min(self.max_steps, len(self.batches))

    def __iter__(self):
        for batch in islice(self.batches, len(self)):
            self.marks.append(time.perf_counter())
            yield batch


def timed(fn, clock: StepClock | None = None) -> dict:
    """Run ``fn`` (returning an image count); report images/s, step times and CPU use."""
    if clock is not None:
        clock.marks.clear()
    before, start = cpu_snapshot(), time.perf_counter()
    images = fn()
    end = time.perf_counter()
    wall_s = end - start
    out = {"images": images, "wall_s": round(wall_s, 3), "images_per_s": round(images / wall_s, 2)}
    if clock is not None and clock.marks:
        steps_s = [b - a for a, b in zip(clock.marks, clock.marks[1:] + [end])]
        step_s = statistics.median(steps_s)
        out |= {"step_ms_median": round(1000 * step_s, 1),
                "step_median_images_per_s": round(images / len(steps_s) / step_s, 2)}
    return out | cpu_usage(before, cpu_snapshot(), wall_s)
