"""PNG plots of a PCA: cumulative explained variance and a 2-D scatter coloured by label (matplotlib, Agg)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, url: str) -> None:
    from imgfeat.metadata.storage import staged_file

    with staged_file(url) as tmp:
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
