"""Deliberate crashes for the fault-injection tests, driven by the ``IMGFEAT_FAULT`` environment variable.

Installed through the one test hook of the shipped code: ``IMGFEAT_HOOK=faults_driver:install`` (with
this folder on PYTHONPATH; ``run_helpers.subprocess_env`` sets both), which makes featurize call
``install(rank)`` at start-up and route every ``imgfeat.metadata.contracts.hooks.fault_point`` here.

Inactive unless the variable is set. ``IMGFEAT_FAULT=KIND:N[,rank=R][,signal=TERM][,once=FILE]`` kills this
process (SIGKILL, or SIGTERM with ``signal=TERM``) at one point of the N-th shard it writes:

* ``kill_before_write``: the shard's stale files are gone, nothing of it is written yet;
* ``kill_mid_data``: a data file is half written (its temporary holds the first half of its bytes);
* ``kill_after_data``: a data file is fully written and fsynced under its temporary name, not renamed;
* ``kill_after_rename`` (alias ``kill_before_marker``): every data file is committed, the marker is not;
* ``kill_after_marker``: the marker is written, nothing after it has run;
* ``kill_after_batches``: after the N-th batch the model computed (counted over the whole run);
* ``segv_decode,file=PATH``: every decode of PATH's bytes dies of SIGSEGV, as a native codec crash does
  (in the DataLoader worker that decodes it; the workers are forked after this hook is installed).

``rank=R`` arms it on that rank only; ``once=FILE`` fires only while FILE does not exist and creates it on
firing, so a restarted process (torchrun ``--max-restarts``) runs clean.
"""
from __future__ import annotations

import logging
import os
import signal
import time

from imgfeat.metadata.contracts.hooks import Observer

log = logging.getLogger(__name__)

FAULT_ENV = "IMGFEAT_FAULT"

SHARD_POINTS = ("before_write", "mid_data", "after_data", "after_rename", "after_marker")
"""The points of a shard's life, in order, at which ``kill_<point>`` fires."""

_ALIASES = {"kill_before_marker": "kill_after_rename"}
KINDS = tuple(f"kill_{p}" for p in SHARD_POINTS) + ("kill_after_batches", "segv_decode", *_ALIASES)


class Faults:
    """The fault armed for this process by ``IMGFEAT_FAULT`` (if any) and the hook that fires it."""

    def __init__(self, rank: int, spec: str | None = None) -> None:
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.kind, self.n, self.sig, self.once = "", 0, signal.SIGKILL, ""
        self.batches = self.shards = 0
        self.armed_shard = False
        self.victim = ""
        if not spec:
            return
        parts = spec.split(",")
        kind, _, n = parts[0].partition(":")
        kind = _ALIASES.get(kind, kind)
        if kind not in KINDS:
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
        opts = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        if "rank" in opts and int(opts["rank"]) != rank:
            return
        self.once = opts.get("once", "")
        if self.once and os.path.exists(self.once):
            return
        self.kind, self.n = kind, int(n or 1)
        self.sig = signal.SIGTERM if opts.get("signal", "KILL").upper() == "TERM" else signal.SIGKILL
        if self.kind == "segv_decode":
            if "file" not in opts:
                raise ValueError(f"{FAULT_ENV}: segv_decode needs ,file=PATH")
            self.victim = os.path.abspath(opts["file"])

    @property
    def observer(self) -> Observer | None:
        """What watches the hook's points for this fault (None when no fault is armed here)."""
        return self.on_point if self.kind else None

    @property
    def point(self) -> str:
        """The shard point this fault fires at ('' for none or a batch fault)."""
        return self.kind[len("kill_"):] if self.kind in tuple(f"kill_{p}" for p in SHARD_POINTS) else ""

    def on_point(self, event: str, path: str) -> None:
        """The observer of ``hooks.fault_point``: fires the armed fault at its point."""
        if event == "batch_done":
            if self.kind == "kill_after_batches":
                self.batches += 1
                if self.batches >= self.n:
                    self._die(f"after {self.batches} batches")
            return
        if event == "decode":
            if self.victim and path.removeprefix("file://") == self.victim:
                os.kill(os.getpid(), signal.SIGSEGV)  # as a native codec crash does, in the loader worker
            return
        if event == "shard_start":
            self.shards += 1
            self.armed_shard = self.shards == self.n
        if not self.armed_shard:
            return
        point = self.point
        if point == "before_write" and event == "shard_start":
            self._die(f"before writing shard {os.path.basename(path)}")
        elif point in ("mid_data", "after_data") and event == "staged":
            if point == "mid_data":
                size = os.path.getsize(path)
                os.truncate(path, size // 2)  # what a kill during the write leaves: a prefix of the bytes
                self._die(f"mid-data ({size // 2} of {size} bytes of {os.path.basename(path)})")
            self._die(f"after writing {os.path.basename(path)}, before its rename")
        elif point == "after_rename" and event == "marker_next":
            self._die(f"before writing marker of {os.path.basename(path)}")
        elif point == "after_marker" and event == "marker_done":
            self._die(f"after writing marker of {os.path.basename(path)}")

    def _die(self, when: str) -> None:
        log.warning("%s: fault injection, %s %s", FAULT_ENV, self.sig.name, when)
        if self.once:
            open(self.once, "w").close()
        logging.shutdown()
        os.kill(os.getpid(), self.sig)
        time.sleep(60)  # SIGTERM may be handled (torch.distributed's elastic agent); never return


def install(rank: int) -> Observer | None:
    """``IMGFEAT_HOOK=faults_driver:install``: the observer of the fault ``IMGFEAT_FAULT`` arms on ``rank``."""
    return Faults(rank).observer
