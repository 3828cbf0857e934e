"""Where a trial runs: in-process or as a Ray Train rank (ranks.py), and the Ray Train
entry points (workers.py)."""
