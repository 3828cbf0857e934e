"""Stress: the killed-driver test, many times on each storage, outside the normal suite.

Runs ``tests/test_cluster.py::test_killed_driver_resumes_without_rerunning_or_duplicating``
``--repeat`` times on S3 (moto's server), on a shared filesystem and with the study in
PostgreSQL, each storage in one pytest session against one real ``ray start --head``, and
writes the pass counts and durations to ``bench/results/killed_driver_stress.json``. Start no other Ray on this
machine meanwhile: two local clusters confuse Ray Train's address detection.

    .venv/bin/python tests/stress/killed_driver.py [--repeat 20] [--storage s3 shared_fs postgres]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST = "tests/test_cluster.py::test_killed_driver_resumes_without_rerunning_or_duplicating"


def run_storage(storage: str, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST, "-k", storage,
             f"--junitxml={junit}"],
            cwd=REPO, env={**os.environ, "TUNECV_STRESS_REPEAT": str(repeat)}, capture_output=True, text=True,
        )
        cases = ET.parse(junit).getroot().iter("testcase")
        results = [{"name": c.get("name"), "time_s": float(c.get("time")),
                    "passed": not any(child.tag in ("failure", "error") for child in c),
                    "failure": next((child.get("message", "")[:500] for child in c
                                     if child.tag in ("failure", "error")), None)} for c in cases]
    return {"storage": storage, "runs": len(results), "passed": sum(r["passed"] for r in results),
            "session_s": round(time.time() - started, 1), "exit_code": done.returncode, "cases": results,
            "output_tail": done.stdout[-2000:] if done.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--storage", nargs="+", default=["s3", "shared_fs", "postgres"])
    args = parser.parse_args()
    summary = []
    for storage in args.storage:
        result = run_storage(storage, args.repeat)
        print(f"{storage}: {result['passed']}/{result['runs']} passed in {result['session_s']} s", flush=True)
        summary.append(result)
    sys.path.insert(0, str(REPO))  # run as a script: bench/ is importable from the repository root
    from bench._common import write_result

    # Storages not run this time keep their earlier result, stamped with its own commit.
    import json

    from bench._common import RESULTS

    earlier = RESULTS / "killed_driver_stress.json"
    if earlier.is_file():
        old = json.loads(earlier.read_text())
        summary += [{**r, "commit": r.get("commit", old["commit"])} for r in old["results"]
                    if r["storage"] not in args.storage]
    out = write_result("killed_driver_stress", {"what": "killed-driver test, repeated per storage",
                                                "repeat": args.repeat, "results": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
