"""Deliberate crashes for the fault-injection tests, driven by the ``IMGFEAT_FAULT`` environment variable.

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
firing, so a restarted process (torchrun ``--max-restarts``) runs clean. The writer side calls
``metadata.shards.fault_point``; this module installs the hook that watches those points.
"""
from __future__ import annotations

import logging
import os
import signal
import time

from metadata import shards

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
        if isinstance(getattr(shards.get_fault_hook(), "__self__", None), Faults):
            shards.set_fault_hook(None)  # a fault of an earlier run in this process must not linger
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
            _crash_decoder_on(opts["file"])
        elif self.kind != "kill_after_batches":
            shards.set_fault_hook(self._on_point)

    @property
    def point(self) -> str:
        """The shard point this fault fires at ('' for none or a batch fault)."""
        return self.kind[len("kill_"):] if self.kind in tuple(f"kill_{p}" for p in SHARD_POINTS) else ""

    def batch_done(self) -> None:
        """Called by the runner after every computed batch."""
        if self.kind == "kill_after_batches":
            self.batches += 1
            if self.batches >= self.n:
                self._die(f"after {self.batches} batches")

    def _on_point(self, event: str, path: str) -> None:
        """The hook ``metadata.shards`` calls at each point of a shard's life."""
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


def _crash_decoder_on(path: str) -> None:
    """Make ``preprocess.dataset``'s decoder die of SIGSEGV on the bytes of ``path``."""
    from preprocess import dataset as dataset_mod

    with open(path, "rb") as fh:
        victim = fh.read()
    decode = getattr(dataset_mod.decode_image, "__wrapped__", dataset_mod.decode_image)

    def crashing_decode(data: bytes, *args: object, **kwargs: object) -> object:
        if data == victim:
            os.kill(os.getpid(), signal.SIGSEGV)
        return decode(data, *args, **kwargs)

    crashing_decode.__wrapped__ = decode  # type: ignore[attr-defined]
    dataset_mod.decode_image = crashing_decode  # type: ignore[assignment]
