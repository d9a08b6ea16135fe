"""Plots of spike rasters, output spike times, state traces and training curves.

All functions take plain arrays (torch tensors on any device, numpy or JAX arrays, lists), never
library objects, return a :class:`matplotlib.figure.Figure` and, given ``path``, also save it as
a PNG (parent folders are created). Figures are built with the object-oriented API without
pyplot, so they need no display, never switch the backend and are not kept alive by pyplot's
figure registry (no "too many open figures" in training loops); Jupyter still shows them inline.

Time axes are in the unit of the trial duration ``T`` used by the simulation. Spike times are
``+inf`` (or NaN) where a neuron has no (further) spike, the padding of the kernels' outputs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["raster", "first_spike_times", "feature_maps", "traces", "learning_curves",
           "spike_timing"]

PathLike = Union[str, os.PathLike]

_BAND_COLORS = ("#f2f2f2", "#ffffff")
_SAVE_DPI = 120


def _to_numpy(values: Any, dtype: Any = float) -> np.ndarray:
    """numpy copy of a torch tensor (any device, with grad), JAX/numpy array or list."""
    if hasattr(values, "detach"):  # torch without importing torch here
        values = values.detach().cpu().numpy()
    return np.array(values, dtype=dtype)


def _finish(fig: Figure, path: Optional[PathLike]) -> Figure:
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_SAVE_DPI, format="png")
    return fig


def _check_T(T: Any, argument: str = "T") -> Optional[float]:
    if T is None:
        return None
    T = float(T)
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"{argument} must be a finite trial duration > 0, got {T!r}")
    return T


def raster(
    layers: Sequence[Any],
    T: float,
    names: Optional[Sequence[str]] = None,
    path: Optional[PathLike] = None,
) -> Figure:
    """Spike raster of one example through all layers, stacked vertically (first layer on top).

    Args:
        layers: one spike-time array per layer, shape [N_l, K] (neuron, spike slot; K may differ
            between layers) or [N_l] (at most one spike per neuron); ``+inf``/NaN entries are
            padding (no spike). Layers with ``N_l = 0`` get an empty labelled band.
        T: trial duration; the x axis spans 0..T (spikes outside are not drawn).
        names: band labels, one per layer (default ``"layer 0"``, ``"layer 1"``, ...).
        path: if given, save the figure there as PNG.

    Returns:
        The figure: one band (axes) per layer sharing the time axis 0..T, neuron index on y,
        one tick per spike; each band is labelled with its name, neuron count and spike count.
        Band heights grow with log(N_l), so a 10-neuron output layer stays readable under a
        784-neuron input layer.
    """
    T = _check_T(T)
    arrays = []
    for index, layer in enumerate(layers):
        times = _to_numpy(layer)
        if times.ndim == 1:
            times = times[:, None]
        if times.ndim != 2:
            raise ValueError(
                f"layers[{index}] must have shape [N_l, K] or [N_l], got {times.shape}"
            )
        arrays.append(times)
    if not arrays:
        raise ValueError("layers must contain at least one spike-time array")
    if names is None:
        names = [f"layer {i}" for i in range(len(arrays))]
    if len(names) != len(arrays):
        raise ValueError(f"names has {len(names)} entries but layers has {len(arrays)}")

    ratios = [1.0 + math.log10(1 + a.shape[0]) for a in arrays]
    fig_height = min(1.2 + 1.1 * sum(ratios), 11.0)
    fig = Figure(figsize=(7.0, fig_height))
    axes = fig.subplots(
        len(arrays), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios}
    )[:, 0]
    for index, (ax, times, name, ratio) in enumerate(zip(axes, arrays, names, ratios)):
        n_neurons = times.shape[0]
        in_trial = np.isfinite(times) & (times >= 0) & (times <= T)
        neuron, _ = np.nonzero(in_trial)
        spike_times = times[in_trial]
        ax.set_facecolor(_BAND_COLORS[index % 2])
        # Tick length about one neuron row (in points), bounded to stay visible and tidy.
        row_points = 0.75 * 72 * fig_height * ratio / sum(ratios) / max(n_neurons, 1)
        tick = min(max(row_points, 2.0), 10.0)
        ax.scatter(
            spike_times, neuron, marker="|", s=tick**2, linewidths=1.0, color=f"C{index % 10}"
        )
        ax.set_ylim(max(n_neurons, 1) - 0.5, -0.5)  # neuron 0 on top, like an image row
        if n_neurons == 0:
            ax.set_yticks([])
            ax.text(
                0.5,
                0.5,
                "no neurons",
                ha="center",
                va="center",
                fontsize=8,
                color="0.4",
                transform=ax.transAxes,
            )
        else:
            ax.yaxis.get_major_locator().set_params(integer=True, nbins=4)
        ax.set_ylabel(f"{name}\n{n_neurons} neurons\n{spike_times.size} spikes", fontsize=8)
    axes[-1].set_xlim(0.0, T)
    axes[-1].set_xlabel("time")
    axes[0].set_title("spike raster")
    return _finish(fig, path)


def first_spike_times(
    times: Any,
    label: Optional[int] = None,
    pseudo_mask: Optional[Any] = None,
    T: Optional[float] = None,
    path: Optional[PathLike] = None,
) -> Figure:
    """First-spike times of the output neurons of one example (time-to-first-spike readout).

    Args:
        times: [N_out] first-spike time of each output neuron; ``+inf``/NaN = neither spike nor
            pseudospike.
        label: true class (index into ``times``), marked with a star; optional.
        pseudo_mask: [N_out] bool, True where the time is a pseudospike time rather than an
            ordinary spike. Default: ``times >= T`` when ``T`` is given, else no pseudospikes.
        T: trial duration, drawn as a vertical line (pseudospikes lie at or after it).
        path: if given, save the figure there as PNG.

    Returns:
        The figure: one horizontal bar per output neuron (filled = spike, hatched = pseudospike,
        "silent" = none). The predicted class is the earliest finite time (pseudospikes count),
        drawn in red; with no finite time there is no prediction.
    """
    times = _to_numpy(times).reshape(-1)
    T = _check_T(T)
    n_out = times.size
    finite = np.isfinite(times)
    if pseudo_mask is None:
        pseudo = finite & (times >= T) if T is not None else np.zeros(n_out, dtype=bool)
    else:
        pseudo = _to_numpy(pseudo_mask, dtype=bool).reshape(-1)
        if pseudo.shape != times.shape:
            raise ValueError(
                f"pseudo_mask must have shape {times.shape} like times, got {pseudo.shape}"
            )
    if label is not None and not 0 <= int(label) < n_out:
        raise ValueError(f"label must be a class index in 0..{n_out - 1}, got {label!r}")
    predicted = int(np.argmin(np.where(finite, times, np.inf))) if finite.any() else None

    right_edge = max([T or 0.0] + list(times[finite])) or 1.0
    fig = Figure(figsize=(7.5, 1.4 + 0.35 * max(n_out, 1)))
    ax = fig.add_subplot()
    for neuron in range(n_out):
        color = "tab:red" if neuron == predicted else "tab:blue"
        if finite[neuron]:
            ax.barh(
                neuron,
                times[neuron],
                height=0.6,
                color=color if not pseudo[neuron] else "none",
                edgecolor=color,
                hatch="///" if pseudo[neuron] else None,
                linewidth=1.2,
            )
        else:
            ax.text(0.01 * right_edge, neuron, "silent", va="center", fontsize=8, color="0.4")
    if label is not None:
        label = int(label)
        x = times[label] if finite[label] else 0.0
        ax.plot(
            [x],
            [label],
            marker="*",
            markersize=14,
            color="gold",
            markeredgecolor="black",
            linestyle="none",
            zorder=3,
        )
    if T is not None:
        ax.axvline(T, color="black", linestyle="--", linewidth=1.0)
    ax.set_yticks(range(n_out))
    ax.set_ylim(-0.7, n_out - 0.3)
    ax.set_xlim(0.0, 1.08 * right_edge)
    ax.invert_yaxis()
    ax.set_xlabel("first spike time")
    ax.set_ylabel("output neuron (class)")
    handles = [
        Line2D([], [], color="tab:red", linewidth=6, label="predicted (earliest)"),
        Line2D([], [], color="tab:blue", linewidth=6, label="spike"),
        Line2D(
            [],
            [],
            color="tab:blue",
            linewidth=0,
            marker="s",
            markerfacecolor="none",
            markersize=10,
            label="pseudospike (hatched)",
        ),
    ]
    if label is not None:
        handles.append(
            Line2D(
                [],
                [],
                marker="*",
                markersize=12,
                color="gold",
                markeredgecolor="black",
                linestyle="none",
                label="true label",
            )
        )
    if T is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label="trial end T"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = "output first-spike times"
    if predicted is None:
        title += " (all silent: no prediction)"
    ax.set_title(title)
    return _finish(fig, path)


def feature_maps(
    times: Any,
    T: float,
    shape: Optional[Sequence[int]] = None,
    titles: Optional[Sequence[str]] = None,
    max_channels: int = 16,
    path: Optional[PathLike] = None,
) -> Figure:
    """First-spike times of a convolutional layer's neurons as images, one row per sample.

    Args:
        times: ``[S, C, H, W]`` first-spike time of each neuron of ``S`` samples, or ``[S, N]``
            / ``[S, N, K]`` (the layer's output ``Spikes.times``, the first column is used) with
            ``shape = (C, H, W)``, ``N = C H W`` channel-major; ``+inf``/NaN or ``>= T`` =
            silent in the trial.
        T: trial duration (the colour scale runs from 0 to ``T``).
        shape: ``(C, H, W)`` when ``times`` is flattened.
        titles: one label per sample (row), e.g. its class; optional.
        max_channels: channels shown per sample (the first ones).
        path: if given, save the figure there as PNG.

    Returns:
        The figure: one image per sample and channel, early spikes bright, late ones dark,
        silent neurons grey.
    """
    T = _check_T(T)
    values = _to_numpy(times)
    if values.ndim == 3 and shape is not None:
        values = values[..., 0]
    if shape is not None:
        if values.ndim != 2 or len(shape) != 3 or values.shape[1] != math.prod(shape):
            raise ValueError(
                f"times of shape {values.shape} do not flatten the grid shape={tuple(shape)}; "
                "give [S, C*H*W] or [S, C*H*W, K] times with shape=(C, H, W)"
            )
        values = values.reshape(values.shape[0], *shape)
    if values.ndim != 4 or values.shape[0] < 1:
        raise ValueError(
            f"times must be [S, C, H, W] (or flattened with shape=(C, H, W)), got {values.shape}"
        )
    if titles is not None and len(titles) != values.shape[0]:
        raise ValueError(f"titles: one per sample ({values.shape[0]}), got {len(titles)}")
    if max_channels < 1:
        raise ValueError(f"max_channels must be >= 1, got {max_channels}")
    n_samples, channels = values.shape[0], min(values.shape[1], max_channels)
    silent = ~np.isfinite(values) | (values >= T)
    masked = np.ma.masked_array(np.where(silent, 0.0, values), mask=silent)
    colormap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#bbbbbb")
    fig = Figure(figsize=(1.2 * channels + 1.5, 1.2 * n_samples + 0.4), layout="constrained")
    grid = fig.subplots(n_samples, channels, squeeze=False)
    image = None
    for row in range(n_samples):
        for channel in range(channels):
            ax = grid[row, channel]
            image = ax.imshow(masked[row, channel], cmap=colormap, vmin=0.0, vmax=T,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"channel {channel}", fontsize=7)
        if titles is not None:
            grid[row, 0].set_ylabel(str(titles[row]), fontsize=7)
    fig.colorbar(image, ax=grid, fraction=0.02, pad=0.01, label="first spike time (grey: silent)")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_SAVE_DPI, format="png")
    return fig


def traces(
    t: Any,
    values: Any,
    T: Optional[float] = None,
    threshold: Optional[float] = None,
    path: Optional[PathLike] = None,
    labels: Optional[Sequence[str]] = None,
    ylabel: str = "state",
) -> Figure:
    """State traces (e.g. membrane potentials) of a few neurons over time.

    Args:
        t: [S] sample times, increasing, in the unit of ``T``.
        values: [S, N] state of N neurons at those times (or [S] for one neuron), in the
            neuron model's units (threshold-normalised for the kernels' models).
        T: trial duration, drawn as a vertical line.
        threshold: spike threshold, drawn as a horizontal line.
        path: if given, save the figure there as PNG.
        labels: legend entries, one per neuron (default ``"neuron i"``; no legend above 10).
        ylabel: y-axis label.
    """
    t = _to_numpy(t).reshape(-1)
    values = _to_numpy(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != t.size:
        raise ValueError(
            f"values must have shape [S, N] with S = len(t) = {t.size}, got {values.shape}"
        )
    T = _check_T(T)
    n_neurons = values.shape[1]
    if labels is None:
        labels = [f"neuron {i}" for i in range(n_neurons)]
    if len(labels) != n_neurons:
        raise ValueError(f"labels has {len(labels)} entries but values has {n_neurons} neurons")

    fig = Figure(figsize=(7.0, 3.5))
    ax = fig.add_subplot()
    for neuron in range(n_neurons):
        ax.plot(t, values[:, neuron], linewidth=1.2, label=labels[neuron])
    if threshold is not None:
        ax.axhline(float(threshold), color="black", linestyle=":", linewidth=1.0, label="threshold")
    if T is not None:
        ax.axvline(T, color="black", linestyle="--", linewidth=1.0, label="trial end T")
    ax.set_xlabel("time")
    ax.set_ylabel(ylabel)
    if n_neurons <= 10:
        ax.legend(fontsize=7)
    ax.set_title("state traces")
    return _finish(fig, path)


def _series_group(key: str) -> str:
    lowered = key.lower()
    if "loss" in lowered:
        return "loss"
    if "acc" in lowered:
        return "accuracy"
    return "other"


def learning_curves(
    history: Mapping[str, Sequence[float]],
    path: Optional[PathLike] = None,
    log_loss: bool = False,
) -> Figure:
    """Per-epoch training curves, one panel per kind of quantity.

    Args:
        history: name -> one value per epoch (e.g. ``train_loss``, ``test_acc``,
            ``test_acc_ordinary``). Keys containing "loss" share a panel, keys containing "acc"
            another (accuracies as fractions 0..1 or percent, as given), the rest a third.
            Series may have different lengths (epoch = position, starting at 1); None/NaN gaps
            are allowed; empty series are skipped.
        path: if given, save the figure there as PNG.
        log_loss: logarithmic y axis for the loss panel (all its values must be > 0).
    """
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, series in history.items():
        if hasattr(series, "detach"):
            series = series.detach().cpu().numpy()
        values = np.array(
            [
                np.nan if v is None else float(v)
                for v in np.asarray(series, dtype=object).reshape(-1)
            ]
        )
        if values.size:
            groups.setdefault(_series_group(key), []).append((key, values))
    order = [g for g in ("loss", "accuracy", "other") if g in groups]

    fig = Figure(figsize=(4.5 * max(len(order), 1), 3.5))
    if not order:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no history yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _finish(fig, path)
    for panel, group in enumerate(order, start=1):
        ax = fig.add_subplot(1, len(order), panel)
        for key, values in groups[group]:
            epochs = np.arange(1, values.size + 1)
            ax.plot(
                epochs, values, marker="o" if values.size <= 30 else None, markersize=3, label=key
            )
        if group == "loss" and log_loss:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(group)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _finish(fig, path)


def spike_timing(
    before: Any,
    after: Any,
    targets: Any,
    T: float,
    path: Optional[PathLike] = None,
) -> Figure:
    """Spike times before and after training against target times (target-time experiments).

    Args:
        before: [K] spike times before training (``+inf``/NaN = spike missing).
        after: [K] spike times after training.
        targets: [K] target times.
        T: trial duration; missing spikes are drawn above it, at ``1.1 T`` ("missing").
        path: if given, save the figure there as PNG.

    Returns:
        The figure: for each spike index k (x axis) the target (black bar), the time before
        (grey circle) and after (red dot) training, with an arrow from before to after.
    """
    T = _check_T(T)
    before = _to_numpy(before).reshape(-1)
    after = _to_numpy(after).reshape(-1)
    targets = _to_numpy(targets).reshape(-1)
    if not before.shape == after.shape == targets.shape:
        raise ValueError(
            f"before, after and targets must have the same shape [K], got {before.shape}, "
            f"{after.shape}, {targets.shape}"
        )
    missing_y = 1.1 * T

    def shown(times: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(times), times, missing_y)

    k = np.arange(targets.size)
    fig = Figure(figsize=(min(max(5.0, 0.4 * targets.size + 3.0), 14.0), 3.8))
    ax = fig.add_subplot()
    ax.scatter(
        k, targets, marker="_", s=400, linewidths=2.5, color="black", label="target", zorder=3
    )
    ax.scatter(
        k,
        shown(before),
        marker="o",
        s=40,
        facecolors="none",
        edgecolors="0.5",
        label="before",
        zorder=4,
    )
    ax.scatter(k, shown(after), marker="o", s=25, color="tab:red", label="after", zorder=5)
    for x, y0, y1 in zip(k, shown(before), shown(after)):
        if abs(y1 - y0) > 1e-3 * T:
            ax.annotate(
                "",
                xy=(x, y1),
                xytext=(x, y0),
                arrowprops=dict(arrowstyle="->", color="0.6", linewidth=0.8),
            )
    ax.axhline(T, color="black", linestyle="--", linewidth=1.0, label="trial end T")
    ticks = list(np.linspace(0.0, T, 5))
    ax.set_yticks(ticks + [missing_y], [f"{y:.3g}" for y in ticks] + ["missing"])
    ax.set_ylim(0.0, 1.16 * T)
    ax.set_xlim(-0.6, max(targets.size, 1) - 0.4)
    ax.set_xticks(k)
    ax.set_xlabel("spike index")
    ax.set_ylabel("spike time")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("spike times vs targets")
    return _finish(fig, path)
