"""`tunecv retrain` that stops in one of its crash windows, for the tests that SIGKILL
it there. The pause wraps the next registry write of that kind from here, so nothing of
the kind ships in the product.

    python tests/retrain_paused.py WINDOW --config run.yaml

WINDOW is one of:

- ``model-version``: the candidate's MLflow run is logged with its bundle, and no model
  version was created yet;
- ``registering``: the version exists, tagged ``registering``, and nothing after it ran;
- ``champion``: the version is registered and ``challenger`` points at it; ``champion``
  was not moved yet.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow import MlflowClient  # noqa: E402

from search.cli import main  # noqa: E402
from search.retrain.registry import CHAMPION, REGISTERED, Registry  # noqa: E402

WINDOW = sys.argv[1]


def _pause() -> None:
    print(f"paused at {WINDOW}", flush=True)
    time.sleep(3600)


def _paused_before(owner, name: str, when) -> None:
    original = getattr(owner, name)

    def paused(*args, **kwargs):
        if when(*args, **kwargs):
            _pause()
        return original(*args, **kwargs)

    setattr(owner, name, paused)


if WINDOW == "model-version":
    _paused_before(MlflowClient, "create_model_version", lambda *args, **kwargs: True)
elif WINDOW == "registering":
    _paused_before(Registry, "mark", lambda self, version, key, value: value == REGISTERED)
elif WINDOW == "champion":
    _paused_before(Registry, "point", lambda self, alias, version: alias == CHAMPION)
else:
    sys.exit(f"unknown window {WINDOW!r}")
sys.exit(main(["retrain", *sys.argv[2:]]))
