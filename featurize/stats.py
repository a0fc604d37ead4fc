"""Per-rank run statistics: what one rank did in this run (counts, per-stage timings, resources).

``ShardComputer`` fills them while it computes; ``summary.finish_run`` writes them to
``FEAT/_stats/ATTEMPT-rankN.json`` and adds up every rank's into the run summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("read_decode", "transfer", "forward", "write")
"""The timed stages of the shard loop, in the order a batch passes them."""


@dataclass
class RankStats:
    """What one rank did in this run."""

    rank: int = 0
    shards: list[int] = field(default_factory=list)
    images: int = 0
    rejects: int = 0
    batches: int = 0
    attempts_failed: int = 0
    timings: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    wall_s: float = 0.0
    setup_s: float = 0.0
    """Start to the first shard: process group, manifest, model build and warm-up, folder checks."""
    loop_s: float = 0.0
    """The shard loop: loaders, decode waits, transfers, forwards and writes of every shard."""
    threads: int = 1
    device: str = "cpu"
    workers: int = 0
    """Decode workers (``runner.loader_workers``)."""
    batch_size: int = 0
    """The batch size the rank ran with (``preprocess.batch_size``, or the probe's choice)."""
    model_only_img_s: float = 0.0
    """Images/s of the model alone at the batch shape (timed forwards of the warm model on a constant batch,
    during the warm-up): the ceiling the end-to-end figure is compared with."""
    decode_device: str = "cpu"
    """Where JPEGs were decoded: ``cpu`` or ``gpu`` (``featurize.decode_device``, ``auto`` resolved)."""
    decode_fallbacks: dict[str, int] = field(default_factory=dict)
    """GPU decode only: images decoded on the CPU instead, by reason (``featurize.gpu_decode``)."""
    gpu_decoded: int = 0
    """GPU decode only: images decoded on the device."""
    decode_probe: dict[str, float] = field(default_factory=dict)
    """``decode_device = auto``: the measured end-to-end img/s of each decode (``gpu``, ``cpu``)."""
    batch_probe: dict[str, float] = field(default_factory=dict)
    """``featurize.batch_probe``: img/s of the model at each batch size tried."""
