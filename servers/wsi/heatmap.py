"""Heatmaps of any per-tile value drawn over the slide thumbnail."""

from __future__ import annotations

import numpy as np

from servers.common.errors import ToolError


def value_grid(grid, values, thumb_shape: tuple[int, int], thumb_downsample: float) -> np.ndarray:
    """Float image at thumbnail scale: each tile's footprint filled with its value (NaN elsewhere;
    overlapping tiles: the later one wins)."""
    vals = np.asarray(values, dtype=np.float64)
    if len(vals) != len(grid):
        raise ToolError(f"{len(vals)} values for {len(grid)} tiles.", hint="Pass one value per tile row.")
    out = np.full(thumb_shape[:2], np.nan)
    for x, y, s, v in zip(grid["x"].to_numpy(), grid["y"].to_numpy(), grid["size0"].to_numpy(), vals):
        x0, y0 = int(x / thumb_downsample), int(y / thumb_downsample)
        x1, y1 = int(np.ceil((x + s) / thumb_downsample)), int(np.ceil((y + s) / thumb_downsample))
        out[y0:y1, x0:x1] = v
    return out


def heatmap_png(thumbnail: np.ndarray, field: np.ndarray, *, title: str = "", cmap: str = "viridis",
                categorical: bool = False, alpha: float = 0.55, vmin: float | None = None,
                vmax: float | None = None) -> bytes:
    """Thumbnail with the value field blended on top, with a colour bar (matplotlib figure → PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from servers.common.images import figure_png

    h, w = thumbnail.shape[:2]
    fig, ax = plt.subplots(figsize=(7, 7 * h / max(w, 1) + 0.4))
    ax.imshow(thumbnail)
    masked = np.ma.masked_invalid(field)
    if categorical:
        cm = plt.get_cmap("tab10")
        im = ax.imshow(masked, cmap=cm, alpha=alpha, vmin=-0.5, vmax=9.5, interpolation="nearest")
    else:
        im = ax.imshow(masked, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title)
    ax.axis("off")
    return figure_png(fig)
