"""The ``sharpjax`` command line: compare, train and measure.

.. code-block:: bash

  sharpjax compare                       # sgd sam saf mesa, noisy MNIST-1D
  sharpjax compare --preset clean12      # 12 methods, clean labels
  sharpjax compare --methods all --resume  # every method; keep finished runs
  sharpjax train --method saf --save-every 100 --out runs/saf
  sharpjax train --method saf --out runs/saf --resume
  sharpjax measure runs/saf/checkpoints --density --landscape

``python -m sharpjax.cli`` is the same command. Its extra dependencies (tqdm,
matplotlib, orbax-checkpoint, mnist1d) come with ``pip install
"sharpjax[cli]"``; ``import sharpjax`` does not import this package.

Methods are entries of a registry (:mod:`sharpjax.cli._methods`): a name, its
hyper-parameters with defaults, and how to build the transformation put in
front of SGD; adding a variant to the command line is one entry.
"""

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``sharpjax`` console script; returns the exit code."""
  from sharpjax.cli import _main  # pylint: disable=g-import-not-at-top
  return _main.main(argv)


__all__ = ["main"]
