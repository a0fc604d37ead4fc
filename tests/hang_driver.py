"""A test hook that parks every featurize rank at its first shard: it writes ``rank<R>.pid`` into
``IMGFEAT_HANG_DIR`` and sleeps, so a test can kill the launcher while the ranks are busy and watch
what becomes of them. Installed with ``IMGFEAT_HOOK=hang_driver:install`` (tests/ on PYTHONPATH)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from imgfeat.metadata.contracts.hooks import Observer

HANG_S = 300.0


def install(rank: int) -> Observer:
    """The observer for ``rank``: at the first ``shard_start``, write the pid file and sleep ``HANG_S``."""
    def on_point(event: str, subject: str) -> None:
        if event == "shard_start":
            Path(os.environ["IMGFEAT_HANG_DIR"], f"rank{rank}.pid").write_text(str(os.getpid()))
            time.sleep(HANG_S)

    return on_point
