"""Typed configuration: one dataclass per stage, loaded from TOML, overridden by CLI flags.

Pure Python (no Spark import): every stage and both engines read it. Mistakes raise
``ValueError`` naming the offending key as ``section.key``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgfeat.metadata.contracts.sniff import DEFAULT_MAX_JPEG_SCANS, KNOWN_IMAGE_FORMATS
from imgfeat.metadata.storage import canonical_digest

log = logging.getLogger(__name__)

RESIZE_POLICIES = ("resize_shorter+center_crop", "resize", "letterbox")
INTERPOLATIONS = ("nearest", "linear", "area", "cubic", "lanczos")
PRECISIONS = ("fp32", "bf16", "fp16")
REDUCED_DECODE_MODES = ("off", "safe", "fast")
CHOICES: dict[str, tuple[str, ...]] = {
    "manifest.validation": ("header", "full"),
    "manifest.label_from": ("parent", "regex", "csv"),
    "manifest.near_duplicates": ("flag", "drop", "off"),
    "manifest.table_format": ("parquet", "delta"),
    "pca.table_format": ("parquet", "delta"),
    "preprocess.resize_policy": RESIZE_POLICIES,
    "preprocess.interpolation": INTERPOLATIONS,
    "preprocess.alpha": ("composite", "drop"),
    "preprocess.reduced_decode": REDUCED_DECODE_MODES,
    "prep.resize_policy": RESIZE_POLICIES,
    "prep.format": ("hdf5", "npy"),
    "prep.compression": ("lzf", "gzip", "none"),
    "featurize.pool": ("avg", "max", "none"),
    "featurize.precision": PRECISIONS,
    "featurize.format": ("npy", "hdf5"),
    "featurize.dtype": ("float32", "float16"),
    "featurize.decode_device": ("cpu", "gpu", "auto"),
    "tiles.edge": ("clip", "pad"),
}
"""The allowed values of every key that takes one of a few strings (validation and command-line choices)."""
_LEGACY_BOOL_VALUES = {"preprocess.reduced_decode": {True: "safe", False: "off"}}
"""Keys that were booleans once: the old value read from a config file or given in code, and its meaning now."""


_DECODE_KEYS = ("max_bytes", "max_pixels", "max_jpeg_scans", "formats")
MOVED_KEYS = {f"{section}.{key}": f"decode.{key}" for section in ("manifest", "preprocess") for key in _DECODE_KEYS}
"""Keys that lived in two sections once and are now one key of ``[decode]``: old name -> new name."""
READS_DECODE = ("manifest", "preprocess")
"""Sections whose stage reads ``[decode]``: their fingerprints include it (as their own keys, as before)."""


def check_choices(section: str, obj: Any) -> None:
    """ValueError naming ``section.key`` for any field of ``obj`` outside its ``CHOICES``."""
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        allowed = CHOICES.get(key)
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def legacy_value(key: str, value: Any) -> Any:
    """``value`` for ``key`` (``section.key``), with a legacy boolean replaced by what it means now."""
    table = _LEGACY_BOOL_VALUES.get(key)
    return table[value] if table is not None and isinstance(value, bool) else value


@dataclass
class SparkConfig:
    """How to reach Spark; used by the manifest and pca stages."""

    master: str = "local[*]"
    """Spark master URL: local[*], spark://host:7077, yarn, ..."""
    app_name: str = "imgfeat"
    """Spark application name."""
    driver_memory: str = "2g"
    """spark.driver.memory (the driver holds counts and d x d matrices only)."""
    partitions: int = 0
    """Tasks for per-file checks (manifest) and per-shard work (pca); 0 = one per core (default parallelism)."""
    conf: dict[str, str] = field(default_factory=dict)
    """Extra ``spark.*`` settings passed to the session builder as they are."""

    def validate(self) -> None:
        if self.partitions < 0:
            raise ValueError("spark.partitions must be >= 0")
        for key in self.conf:
            if not key.startswith("spark."):
                raise ValueError(f"spark.conf.{key}: Spark settings start with 'spark.'")


@dataclass
class DecodeConfig:
    """Limits and formats of every decode: the manifest checks and the decoder read this one section."""

    max_bytes: int = 64 * 1024 * 1024
    """Files larger than this are too_large: not read by the manifest, refused by the decoder."""
    max_pixels: int = 100_000_000
    """Images whose header claims more pixels are too_large (decompression bombs); also OpenCV's own limit."""
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    """JPEGs with more scans are too_large (progressive-JPEG CPU bombs); 0 = no limit."""
    formats: list[str] = field(default_factory=lambda: list(KNOWN_IMAGE_FORMATS))
    """Formats accepted as images (magic bytes); other recognised formats are ``unsupported_format``."""

    def validate(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"decode.max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_pixels < 1:
            raise ValueError(f"decode.max_pixels must be >= 1, got {self.max_pixels}")
        if self.max_jpeg_scans < 0:
            raise ValueError(f"decode.max_jpeg_scans must be >= 0 (0 = no limit), got {self.max_jpeg_scans}")
        if not self.formats:
            raise ValueError("decode.formats must name at least one format")
        for fmt in self.formats:
            if fmt not in KNOWN_IMAGE_FORMATS:
                raise ValueError(f"decode.formats: unknown format {fmt!r}; known: {', '.join(KNOWN_IMAGE_FORMATS)}")


@dataclass
class ManifestConfig:
    """The manifest job: listing, labels, validation, duplicates, splits and shards."""

    validation: str = "full"
    """``header`` (magic bytes, dimensions, end marker) or ``full`` (decode with OpenCV)."""
    label_from: str = "parent"
    """``parent`` folder name, ``regex`` over the path relative to SRC, or ``csv``."""
    label_regex: str = ""
    """With label_from = "regex": a regex with a named group ``label``."""
    labels_csv: str = ""
    """With label_from = "csv": a CSV with columns ``path,label`` (path relative to SRC or a full URI)."""
    split_from_folders: bool = True
    """Keep folder splits (train/Training/val/test/...) when the path has one."""
    split_ratios: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    """Hash-based split ratios per label, used where the path names no split folder; must sum to 1."""
    split_seed: str = "imgfeat"
    """Seed of the hash order for splits (change it to draw other splits)."""
    rows_per_shard: int = 1000
    """Ok rows per featurize shard (shards differ by at most one row)."""
    table_format: str = "parquet"
    """``parquet``: OUT/manifest is a Parquet folder (an incremental run keeps the previous one under
    OUT/manifest_history/); ``delta``: a Delta table (the ``deltalake`` package), every run one version
    of it, with time travel and history from the table itself (local folders)."""
    near_duplicates: str = "flag"
    """``flag`` (the default): every ok image gets a perceptual hash and quality signals from the check's
    decode (also with ``header`` validation, which then decodes every image); near-duplicate groups are
    found, each group kept in one split (column ``near_duplicate_of``), and the summary gets the groups,
    crossing folder splits and quality outliers; ``drop``: the same, and every member but the group's
    representative gets status ``near_duplicate`` (not featurized); ``off``: none of that, the cheapest
    check (``flag`` took 1.08x the time of ``off`` on 1360x1020 photos with ``full`` validation, 2x on
    500x375 ones and 2.3x on 100 px thumbnails: bench/RESULTS-quality-cost.md).
    Label conflicts among exact duplicates are marked in every mode."""
    near_duplicate_distance: int = 4
    """Hamming distance (of 64 bits) within which two images' perceptual hashes make them near-duplicates
    (chosen from measurements on real photos: bench/RESULTS-near-duplicates.md)."""
    near_duplicate_max_pairs: int = 1_000_000_000
    """Budget of candidate pairs for the near-duplicate search (its band join grows as distinct hashes²
    over 2^(64/(distance+1))): counted before the join, and when the distance would make more, the largest
    smaller distance that fits is used instead, logged and written to the summary."""

    def validate(self) -> None:
        check_choices("manifest", self)
        if not 0 <= self.near_duplicate_distance <= 16:
            raise ValueError("manifest.near_duplicate_distance must be between 0 and 16")
        if self.near_duplicate_max_pairs < 0:
            raise ValueError("manifest.near_duplicate_max_pairs must be >= 0")
        if self.label_from == "regex":
            try:
                groups = re.compile(self.label_regex).groupindex
            except re.error as exc:
                raise ValueError(f"manifest.label_regex {self.label_regex!r} is not a valid regular expression: {exc}") from None
            if "label" not in groups:
                raise ValueError("manifest.label_regex needs a named group (?P<label>...)")
        if self.label_from == "csv" and not self.labels_csv:
            raise ValueError("manifest.labels_csv is required when manifest.label_from = 'csv'")
        if not self.split_ratios or any(v < 0 for v in self.split_ratios.values()):
            raise ValueError("manifest.split_ratios must map split names to non-negative ratios")
        if abs(sum(self.split_ratios.values()) - 1.0) > 1e-6:
            raise ValueError(f"manifest.split_ratios must sum to 1, got {sum(self.split_ratios.values())}")
        if self.rows_per_shard < 1:
            raise ValueError("manifest.rows_per_shard must be >= 1")


@dataclass
class PreprocessConfig:
    """Decoding and transforms shared by featurize and the DataLoader."""

    size: int = 224
    """Output side in pixels (square)."""
    resize_policy: str = "resize_shorter+center_crop"
    """resize_shorter+center_crop, resize (aspect not kept) or letterbox (pad)."""
    resize_shorter: int = 256
    """Shorter side before the centre crop (policy resize_shorter+center_crop)."""
    interpolation: str = "linear"
    """nearest, linear, area, cubic or lanczos (linear matches torchvision)."""
    alpha: str = "composite"
    """``composite`` on ``background`` or ``drop`` the alpha channel."""
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    """RGB background for alpha compositing and letterbox padding."""
    exif_orientation: bool = True
    """Apply the EXIF orientation tag."""
    reduced_decode: str = "safe"
    """JPEG decode at 1/2, 1/4 or 1/8 scale (OpenCV's DCT scaling) before the resize. ``off``: always full
    size. ``safe``: only while the decoded shorter side stays >= 4 x the resize target and the scale divides
    both sides (features as torchvision's: min cosine 0.9998 on real-size photos). ``fast``, opt-in: while
    the shorter side stays >= the target; trades fidelity for decode speed (min cosine 0.977, half the
    photos under 0.999). Legacy ``true`` = safe, ``false`` = off."""
    num_workers: int = -1
    """DataLoader workers; -1 = auto: one per available core, except featurize on a CPU device: one per 4 cores,
    at least one (the model's threads use every core)."""
    batch_size: int = 64
    """Images per batch."""
    prefetch_factor: int = 4
    """Batches each DataLoader worker keeps ready."""

    def __post_init__(self) -> None:
        self.reduced_decode = legacy_value("preprocess.reduced_decode", self.reduced_decode)

    def validate(self) -> None:
        check_choices("preprocess", self)
        if self.size < 1:
            raise ValueError("preprocess.size must be >= 1")
        if self.resize_shorter < self.size and self.resize_policy == "resize_shorter+center_crop":
            raise ValueError("preprocess.resize_shorter must be >= preprocess.size")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ValueError("preprocess.background must be three integers in 0..255")
        if self.batch_size < 1:
            raise ValueError("preprocess.batch_size must be >= 1")
        if self.num_workers < -1:
            raise ValueError("preprocess.num_workers must be >= -1")
        if self.prefetch_factor < 1:
            raise ValueError("preprocess.prefetch_factor must be >= 1")


@dataclass
class PrepConfig:
    """Offline export of resized uint8 arrays for training."""

    size: int = 64
    """Side of the exported square images."""
    resize_policy: str = "resize_shorter+center_crop"
    """How exported images are resized (see preprocess.resize_policy)."""
    format: str = "hdf5"
    """hdf5 or npy shards."""
    split: str = ""
    """Export only this split; empty = all splits."""
    rows_per_shard: int = 2048
    """Images per exported shard."""
    compression: str = "lzf"
    """HDF5 compression: ``lzf``, ``gzip`` or ``none``."""

    def validate(self) -> None:
        check_choices("prep", self)
        if self.size < 1:
            raise ValueError("prep.size must be >= 1")
        if self.rows_per_shard < 1:
            raise ValueError("prep.rows_per_shard must be >= 1")


@dataclass
class FeaturizeConfig:
    """The model and the feature shards."""

    model: str = "resnet50"
    """torchvision classification model name."""
    weights: str = "DEFAULT"
    """A torchvision weights enum name (``IMAGENET1K_V2``, ``DEFAULT``) or ``none``."""
    weights_path: str = ""
    """A local state_dict file; wins over ``weights``."""
    model_path: str = ""
    """A TorchScript or torch.export file; wins over ``model``."""
    layer: str = ""
    """A node name (torchvision feature_extraction); empty = pooled penultimate layer."""
    pool: str = "avg"
    """Global pooling of spatial maps from ``layer``: ``avg``, ``max`` or ``none``."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (autocast)."""
    channels_last: bool = True
    """Run the model in channels_last memory format."""
    compile: bool = False
    """torch.compile the model."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    decode_device: str = "cpu"
    """Where JPEGs are decoded and resized: ``cpu`` (DataLoader workers, OpenCV), ``gpu`` (nvJPEG on the CUDA
    device, resize there; workers only read bytes; other formats and JPEGs the GPU cannot decode fall back
    to the CPU decoder per image) or ``auto`` (on CUDA: times both on the first batches and keeps the faster;
    on a CPU device: cpu). Not in the fingerprint: both match at cosine >= 0.999."""
    batch_probe: bool = False
    """On CUDA: before the run, time doubling batch sizes from ``preprocess.batch_size`` (up to 1024, while
    memory allows) and use the fastest per image. Ignored on a CPU device."""
    format: str = "npy"
    """Feature shard format: npy or hdf5."""
    dtype: str = "float32"
    """Stored feature dtype: float32 or float16."""
    overwrite: bool = False
    """Replace shards of a run with another fingerprint instead of refusing."""
    max_shard_attempts: int = 3
    """Tries per shard before the run fails."""

    def validate(self) -> None:
        check_choices("featurize", self)
        if self.max_shard_attempts < 1:
            raise ValueError("featurize.max_shard_attempts must be >= 1")
        if not self.device or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"featurize.device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class PcaConfig:
    """Join-back and PCA."""

    k: int = 64
    """Number of components (unless variance is set)."""
    variance: float = 0.0
    """If > 0: the smallest k whose cumulative explained variance reaches this fraction."""
    standardize: bool = False
    """Scale each feature to unit variance before PCA (like StandardScaler)."""
    fit_split: str = "train"
    """Split to fit on; empty = all rows."""
    allow_extra: bool = False
    """Accept feature rows with no manifest row (counted) instead of failing."""
    table_format: str = "parquet"
    """``parquet`` or ``delta``: RED/reduced/ as a Parquet folder or as a Delta table (one version per run)."""

    def validate(self) -> None:
        check_choices("pca", self)
        if self.k < 1:
            raise ValueError("pca.k must be >= 1")
        if not 0.0 <= self.variance <= 1.0:
            raise ValueError("pca.variance must be in [0, 1]")


@dataclass
class TilesConfig:
    """Very large images cut into tiles (``contracts/tiles.py``): one manifest row per file, one tile table
    row and one feature row per tile."""

    enabled: bool = False
    """Tile images with a side >= ``min_side`` (they are ``ok`` with a ``tiles`` count and no image shard;
    their tiles go to OUT/tiles/ and are featurized with ``imgfeat featurize --tiles``)."""
    tile_size: int = 512
    """Side of a tile in pixels of the chosen pyramid level (square)."""
    overlap: float = 0.1
    """Fraction of a tile shared with its neighbour (0 <= overlap < 1)."""
    min_side: int = 10000
    """Images with a width or height at or above this are tiled."""
    level: int = 0
    """Pyramid level of multi-resolution TIFFs to tile (0 = full resolution); a file without that level
    gets a reason. Other formats have level 0 only."""
    max_pixels: int = 20_000_000_000
    """The pixel cap of a tiled image (of its chosen level), far above ``decode.max_pixels``. Tiled TIFFs are
    read tile by tile; a format without random access (JPEG, PNG, ...) is decoded whole, once per worker, so
    it must also fit ``decode.max_bytes`` and the worker's memory (3 bytes per pixel)."""
    edge: str = "pad"
    """``pad``: every tile is ``tile_size`` square, black past the image's edge; ``clip``: edge tiles are
    cut to the image."""
    pooled: bool = False
    """``imgfeat run`` also writes RUN/tiles_pooled/: per tiled image, the mean of its tile features (one vector
    per image; ``imgfeat pool-tiles``)."""

    def validate(self) -> None:
        check_choices("tiles", self)
        if self.tile_size < 16:
            raise ValueError("tiles.tile_size must be >= 16")
        if not 0 <= self.overlap < 1:
            raise ValueError("tiles.overlap must be >= 0 and < 1")
        if self.min_side < 1:
            raise ValueError("tiles.min_side must be >= 1")
        if self.level < 0:
            raise ValueError("tiles.level must be >= 0")
        if self.max_pixels < 1:
            raise ValueError("tiles.max_pixels must be >= 1")


@dataclass
class NeighborsConfig:
    """Nearest neighbours by cosine (``imgfeat neighbors``; in ``imgfeat run`` after pca when enabled)."""

    enabled: bool = False
    """``imgfeat run``: after pca, find each image's nearest neighbours among the reduced vectors (RUN/neighbors/;
    one more Spark job) and add a Neighbours section to the report. ``imgfeat neighbors`` ignores it."""
    k: int = 10
    """Neighbours per image."""
    min_cosine: float = 0.95
    """Pairs at or above this cosine are counted as near duplicates, and as leaks when across splits or as
    probable label errors when across labels."""
    cells: int = 0
    """k-means cells; 0 = about sqrt(rows), at most sample_rows / 10 and 4096."""
    nprobe: int = 8
    """Nearest cells each query searches (more: better recall, more work)."""
    sample_rows: int = 20_000
    """Rows collected to the driver to fit the cells (never more than 256 MiB of them)."""
    block_rows: int = 0
    """Base rows a search task holds at once, bigger cells are split; 0 = 128 MiB of vectors, at most 65,536."""
    seed: int = 0
    """Seed of the sample and of k-means."""

    def validate(self) -> None:
        for name, low in (("k", 1), ("cells", 0), ("nprobe", 1), ("sample_rows", 1), ("block_rows", 0), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"neighbors.{name} must be >= {low}, got {getattr(self, name)}")
        if self.cells > 4096:
            raise ValueError(f"neighbors.cells must be at most 4096, got {self.cells}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"neighbors.min_cosine must be between -1 and 1, got {self.min_cosine}")


@dataclass
class RunConfig:
    """The end-to-end ``imgfeat run``."""

    sources: list[str] = field(default_factory=list)
    """SRC folders or URLs for the manifest stage."""
    out: str = ""
    """The run folder: manifest, features, pca and report go under it."""
    nproc: int = 1
    """Featurize processes on this node (torchrun is started when > 1)."""
    stages: list[str] = field(default_factory=lambda: ["manifest", "featurize", "pca"])
    """Stages to run, in order: manifest, prep, featurize, pca."""

    def validate(self) -> None:
        allowed = ("manifest", "prep", "featurize", "pca")
        for stage in self.stages:
            if stage not in allowed:
                raise ValueError(f"run.stages: unknown stage {stage!r}; allowed: {', '.join(allowed)}")
        if self.nproc < 1:
            raise ValueError("run.nproc must be >= 1")


@dataclass
class Config:
    """All sections; each stage reads its own and saves the whole resolved config."""

    spark: SparkConfig = field(default_factory=SparkConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    pca: PcaConfig = field(default_factory=PcaConfig)
    neighbors: NeighborsConfig = field(default_factory=NeighborsConfig)
    tiles: TilesConfig = field(default_factory=TilesConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """A short sha256 of the named sections (all when none are named).

        ``manifest`` and ``preprocess`` are hashed with the ``[decode]`` keys merged in, as they were
        written before that section existed, so runs made then stay up to date; ``manifest`` with the
        ``[tiles]`` section too when tiling is enabled."""
        data = self.to_dict()
        decode = data.pop("decode")
        chosen = {s: ({**data[s], **decode} if s in READS_DECODE else data[s]) for s in (sections or data.keys())}
        if "manifest" in chosen and self.tiles.enabled:  # tiling changes the manifest; off, old runs stay current
            chosen["manifest"] = {**chosen["manifest"], "tiles": data["tiles"]}
        if not sections:
            chosen["decode"] = decode
        return canonical_digest(chosen)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin is dict:
        _, val_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, val_type) for k, v in value.items()}
    if isinstance(annotation, types.UnionType):  # pragma: no cover - no such fields today
        raise ValueError(f"{key}: union types are not supported")
    raise ValueError(f"{key}: unsupported field type {annotation!r}")


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {section}.{key}; known keys: {', '.join(sorted(names))}")
        value = legacy_value(f"{section}.{key}", value)
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def _move_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the old per-section decode keys (``manifest.max_bytes``...) moved to ``[decode]``.

    Two spellings of one key with different values are a ``ValueError`` naming both."""
    moved: dict[str, tuple[str, Any]] = {}
    out: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            out[section] = values
            continue
        kept = {}
        for key, value in values.items():
            new = MOVED_KEYS.get(f"{section}.{key}")
            if new is None:
                kept[key] = value
                continue
            old = f"{section}.{key}"
            if new in moved and moved[new][1] != value:
                raise ValueError(f"{moved[new][0]} = {moved[new][1]!r} and {old} = {value!r} disagree; "
                                 f"both are now {new}: set it once")
            moved[new] = (old, value)
            log.warning("config key %s is now %s (read as that)", old, new)
        out[section] = kept
    if moved:
        decode = dict(out.get("decode") or {})
        for new, (old, value) in moved.items():
            key = new.split(".", 1)[1]
            if key in decode and decode[key] != value:
                raise ValueError(f"{old} = {value!r} and {new} = {decode[key]!r} disagree: set {new} only")
            decode[key] = value
        out["decode"] = decode
    return out


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested ``{section: {key: value}}``, starting from ``base`` or defaults."""
    cfg = base if base is not None else Config()
    data = _move_legacy_keys(data)
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if section not in sections and not isinstance(values, dict):
            raise ValueError(f"{section} = {values!r} is outside any section: every key belongs to one, such as "
                             f"[pca] for k; known sections: {', '.join(sorted(sections))}")
        if section not in sections:
            raise ValueError(f"unknown config section [{section}]; known sections: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ValueError(f"config section [{section}] must be a table")
        _apply(getattr(cfg, section), section, values)
    return cfg


def parse_setting(item: str, cfg: Config) -> tuple[str, str, Any]:
    """``section.key=value`` (``--set``) as (section, key, value); the value is read as a TOML value.

    A value that is not valid TOML, or not a string where the key takes one, is taken as the plain
    string (``--set featurize.model=resnet18``). ``section.key.sub=value`` sets one entry of a table
    key (``--set spark.conf.spark.executor.memory=4g``) and keeps its other entries."""
    name, eq, raw = item.partition("=")
    name = MOVED_KEYS.get(name.strip(), name.strip())
    section, _, key = name.partition(".")
    if not eq or not section or not key:
        raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set pca.k=32")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ValueError(f"--set {item!r}: unknown config section [{section}]; known sections: {', '.join(sorted(sections))}")
    target = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    key, _, sub = key.partition(".")
    if key not in fields:
        raise ValueError(f"--set {item!r}: unknown key {section}.{key}; known keys: {', '.join(sorted(fields))}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    annotation = typing.get_type_hints(type(target))[key]
    if sub:
        if typing.get_origin(annotation) is not dict:
            raise ValueError(f"--set {item!r}: {section}.{key} is not a table")
        if typing.get_args(annotation)[1] is str and not isinstance(value, str):
            value = raw.strip()
        return section, key, {**getattr(target, key), sub: value}
    if annotation is str and not isinstance(value, str):
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                settings: list[str] | None = None) -> Config:
    """Load a TOML file (or defaults), apply ``settings`` (``--set section.key=value``), then
    ``overrides`` (from CLI flags; None values are ignored), validate."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--config: no such file {str(p)!r}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {p}: not valid TOML: {exc}") from exc
        cfg = config_from_dict(data, cfg)
    for item in settings or ():
        section, key, value = parse_setting(item, cfg)
        cfg = config_from_dict({section: {key: value}}, cfg)
    if overrides:
        cleaned = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()}
        cfg = config_from_dict({s: kv for s, kv in cleaned.items() if kv}, cfg)
    return cfg.validate()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to an equal Config."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(val)}" for key, val in values.items())
        lines.append("")
    return "\n".join(lines)
