"""Matplotlib figures for the measures.

``matplotlib`` is imported inside each function (it is in the ``cli`` extra),
so ``import sharpjax.measures`` stays light. Every function returns the
``matplotlib.figure.Figure`` it drew on; pass ``ax`` to draw into an existing
axes instead of a new figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _axes(ax: Any, projection: str | None = None, figsize=(5.0, 4.0)):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if ax is not None:
    return ax.figure, ax
  fig = plt.figure(figsize=figsize)
  ax = fig.add_subplot(1, 1, 1, projection=projection)
  return fig, ax


def _finish(fig: Any, ax: Any, label: str | None) -> Any:
  """A legend when the curve is labelled, a tight layout; the figure."""
  if label is not None:
    ax.legend()
  fig.tight_layout()
  return fig


def plot_spectral_density(
    density: Any,
    *,
    ax: Any = None,
    log_scale: bool = True,
    floor: float = 1e-10,
    label: str | None = None,
):
  """Plots a :class:`SpectralDensity` (PyHessian's layout: semilog-y density).

  Args:
    density: the result of :func:`spectral_density`.
    ax: an existing ``matplotlib`` axes, or None for a new figure.
    log_scale: logarithmic density axis, clipped below at ``floor``.
    floor: the smallest density shown on a log scale.
    label: legend label.

  Returns:
    The ``Figure``.
  """
  fig, ax = _axes(ax)
  grid = np.asarray(density.grid)
  dens = np.asarray(density.density)
  if log_scale:
    ax.semilogy(grid, np.maximum(dens, floor), label=label)
    ax.set_ylim(floor, max(float(dens.max()) * 2.0, floor * 10))
  else:
    ax.plot(grid, dens, label=label)
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  return _finish(fig, ax, label)


def plot_slice_1d(
    slice_1d: Any,
    *,
    ax: Any = None,
    show_error: bool = False,
    label: str | None = None,
    xlabel: str | None = None,
):
  """Plots a :class:`Slice1D` (interpolation or random direction).

  Args:
    slice_1d: the result of :func:`interpolate` or :func:`landscape_1d`.
    ax: an existing axes, or None for a new figure.
    show_error: also plot the error rate on a twin axis (when available).
    label: legend label for the loss curve.
    xlabel: x-axis label; default "alpha" for an interpolation and
      "direction" otherwise.

  Returns:
    The ``Figure``.
  """
  fig, ax = _axes(ax)
  coords = np.asarray(slice_1d.coords)
  ax.plot(coords, np.asarray(slice_1d.loss), label=label or "loss")
  if xlabel is None:
    xlabel = "alpha" if slice_1d.direction is None else "direction"
  ax.set_xlabel(xlabel)
  ax.set_ylabel("loss")
  err = np.asarray(slice_1d.error)
  if show_error and not np.all(np.isnan(err)):
    twin = ax.twinx()
    twin.plot(coords, err, linestyle="--", color="tab:red", label="error")
    twin.set_ylabel("error rate")
  return _finish(fig, ax, label)


def plot_slice_2d(
    slice_2d: Any,
    *,
    kind: str = "contour",
    ax: Any = None,
    levels: int = 30,
    log_scale: bool = False,
):
  """Plots a :class:`Slice2D` as a contour map or a 3D surface.

  Args:
    slice_2d: the result of :func:`landscape_2d`.
    kind: ``"contour"`` (filled contours with lines) or ``"surface"``.
    ax: an existing axes (3D for a surface), or None for a new figure.
    levels: number of contour levels.
    log_scale: plot ``log(loss)``.

  Returns:
    The ``Figure``.
  """
  if kind not in ("contour", "surface"):
    raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}.")
  x = np.asarray(slice_2d.x)
  y = np.asarray(slice_2d.y)
  z = np.asarray(slice_2d.loss)
  if log_scale:
    z = np.log(np.maximum(z, 1e-12))
  gx, gy = np.meshgrid(x, y)
  if kind == "contour":
    fig, ax = _axes(ax)
    filled = ax.contourf(gx, gy, z, levels=levels, cmap="viridis")
    ax.contour(gx, gy, z, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(filled, ax=ax, label="log loss" if log_scale else "loss")
    ax.plot([0.0], [0.0], marker="*", color="w")
    ax.set_aspect("auto")
  else:
    fig, ax = _axes(ax, projection="3d", figsize=(6.0, 5.0))
    ax.plot_surface(gx, gy, z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_zlabel("log loss" if log_scale else "loss")
  ax.set_xlabel("direction 1")
  ax.set_ylabel("direction 2")
  fig.tight_layout()
  return fig
