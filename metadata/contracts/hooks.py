"""The one test hook in the shipped code: named points in a shard's life that a test may watch.

Writers call ``fault_point(event, subject)`` at fixed points:

* ``shard_start`` (the shard's folder/stem), ``staged`` (a temporary data file written, not yet
  committed), ``marker_next`` (data committed, marker not written) and ``marker_done``, in
  ``contracts.shards`` and ``contracts.feature_store``;
* ``batch_done`` after every batch the featurize model computed;
* ``decode`` (the file's URI) before each decode in ``preprocess.dataset``.

Nothing watches them unless ``IMGFEAT_HOOK=module:function`` names a function: ``install_from_env(rank)``
(called by featurize at start-up) imports it and calls it with the rank; it returns the observer
``(event, subject) -> None``, or None. The reliability suite uses it to kill a process at each point
(``tests/faults_driver.py``). Unset, a point costs one global lookup.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable

HOOK_ENV = "IMGFEAT_HOOK"

Observer = Callable[[str, str], None]
_observer: Observer | None = None


def fault_point(event: str, subject: str) -> None:
    """Tell the observer, if any, that ``event`` happened to ``subject``."""
    if _observer is not None:
        _observer(event, subject)


def set_observer(observer: Observer | None) -> None:
    """Install (or with None remove) the observer of every ``fault_point``."""
    global _observer
    _observer = observer


def get_observer() -> Observer | None:
    """The installed observer, if any."""
    return _observer


def install_from_env(rank: int) -> None:
    """Install the observer that ``IMGFEAT_HOOK=module:function`` makes for ``rank`` (unset: leave it as is)."""
    spec = os.environ.get(HOOK_ENV, "")
    if not spec:
        return
    module, _, function = spec.partition(":")
    if not module or not function:
        raise ValueError(f"{HOOK_ENV}={spec!r}: expected module:function")
    set_observer(getattr(importlib.import_module(module), function)(rank))
