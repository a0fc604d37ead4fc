"""The stage's plots: cumulative explained variance and a 2-D scatter coloured by label (PNG, matplotlib Agg).

:func:`write_plots` saves them under RED/; the scatter draws a sample of ``RED/reduced/`` read by Spark
(at most :data:`SCATTER_POINTS` rows reach the driver). matplotlib is an optional extra: without it the
plots are skipped with a warning.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from imgfeat.metadata import storage
from imgfeat.metadata.pca.fit import PcaModel
from imgfeat.metadata.spark.parquet import read_parquet_dataset

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def _figure() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, url: str) -> None:
    """Save ``fig`` as PNG to ``url`` (local path or fsspec URL), atomically."""
    from imgfeat.metadata.storage import staged_file

    with staged_file(url) as tmp, warnings.catch_warnings():
        # A label in a script the bundled font lacks (CJK, ...) draws as boxes; a warning per glyph adds nothing.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def save_variance(spectrum_ratio: np.ndarray, k: int, url: str) -> None:
    """Cumulative explained variance ratio over the computed spectrum, with the chosen k marked."""
    plt = _figure()
    cum = np.cumsum(np.asarray(spectrum_ratio, dtype=np.float64))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, cum.size + 1), cum, lw=1.5)
    if 1 <= k <= cum.size:
        ax.axvline(k, color="tab:red", ls="--", lw=1)
        ax.annotate(f"k={k}: {cum[k - 1]:.3f}", (k, cum[k - 1]), textcoords="offset points", xytext=(6, -14))
    ax.set_xscale("log")
    ax.set_xlabel("number of components")
    ax.set_ylabel("cumulative explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    _save(fig, url)
    plt.close(fig)


def save_scatter(points: np.ndarray, labels: Sequence[str | None], url: str, title: str = "PCA") -> None:
    """First two components, one colour per label (legend when there are at most 20 labels)."""
    plt = _figure()
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    names = ["" if lab is None else str(lab) for lab in labels]
    uniq = sorted(set(names))
    index = {n: i for i, n in enumerate(uniq)}
    codes = np.array([index[n] for n in names], dtype=np.int64)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab20" if len(uniq) <= 20 else "hsv", max(len(uniq), 1))
    if len(uniq) <= 20:
        for name, i in index.items():
            sel = codes == i
            ax.scatter(pts[sel, 0], pts[sel, 1], s=4, alpha=0.6, color=cmap(i), label=name or "(none)")
        if 1 < len(uniq):
            ax.legend(markerscale=3, fontsize=7, loc="best")
    else:
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.5, c=codes, cmap=cmap)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{title}, {len(uniq)} labels")
    _save(fig, url)
    plt.close(fig)


VARIANCE_PLOT = "pca_explained_variance.png"
SCATTER_PLOT = "pca_scatter.png"
SCATTER_POINTS = 20_000


def write_plots(spark: SparkSession, model: PcaModel, reduced_url: str, out: str, rows: int) -> list[str]:
    """Save the plots of ``model`` under ``out``; returns their URLs (none when matplotlib is absent).

    ``reduced_url`` is the written ``RED/reduced/`` dataset and ``rows`` its number of rows.
    """
    try:
        import matplotlib  # noqa: F401  (an optional extra)
    except ImportError as exc:
        log.warning("plots skipped: %s", exc)
        return []
    files = [storage.join(out, VARIANCE_PLOT)]
    save_variance(model.spectrum_ratio, model.k, files[0])
    if model.k >= 1:
        pts, labels = _scatter_sample(spark, reduced_url, rows)
        files.append(storage.join(out, SCATTER_PLOT))
        save_scatter(pts, labels, files[1], title=f"PCA ({len(labels)} of {rows} rows)")
    return files


def _scatter_sample(spark: SparkSession, reduced: str, rows: int) -> tuple[np.ndarray, list[str | None]]:
    """The first two components [m, 2] (0 for a missing second) and labels of at most SCATTER_POINTS rows."""
    from pyspark.sql import functions as F

    df = read_parquet_dataset(spark, reduced, columns=["label", "features_pca"])
    df = df.select("label", F.element_at("features_pca", 1).alias("c1"),
                   F.element_at("features_pca", 2).alias("c2"))
    if rows > SCATTER_POINTS:
        df = df.sample(fraction=min(1.0, 1.2 * SCATTER_POINTS / rows), seed=7).limit(SCATTER_POINTS)
    got = df.collect()
    pts = np.array([[r["c1"], r["c2"] if r["c2"] is not None else 0.0] for r in got], dtype=np.float64).reshape(-1, 2)
    return pts, [r["label"] for r in got]
