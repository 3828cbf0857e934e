"""`tunecv retrain` that stops in the middle of registering its version, for the test
that SIGKILLs it there: the version exists, tagged ``registering``, and nothing after it
has run. The pause wraps the registry's next write from here, so nothing of the kind
ships in the product.

    python tests/retrain_paused.py --config run.yaml
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.cli import main  # noqa: E402
from search.retrain.registry import REGISTERED, Registry  # noqa: E402

_mark = Registry.mark


def _paused_mark(self, version, key, value):
    if value == REGISTERED:
        print("paused at registering", flush=True)
        time.sleep(3600)
    _mark(self, version, key, value)


Registry.mark = _paused_mark
sys.exit(main(["retrain", *sys.argv[1:]]))
