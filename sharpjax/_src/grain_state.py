"""A grain iterator's state as an item of an orbax checkpoint.

The train-state checkpoints (:func:`sharpjax.launch.save_state`, the command
line's) add an item ``data`` with grain's own orbax handler: one JSON file per
process (``process_I-of-N.json``), each process's position and its workers'
states, so that a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

from typing import Any


def _StateOf(base_class, holder):  # pylint: disable=invalid-name
  """A grain ``DatasetIterator`` whose state is ``holder.get_state()``.

  What grain's checkpoint handler writes for an iterator that is not one of
  grain's, e.g. :func:`sharpjax.data.prefetch_to_device`'s, whose position
  is behind its source's.
  """

  class StateOf(base_class):

    def __next__(self):
      raise StopIteration

    def get_state(self):
      return holder.get_state()

    def set_state(self, state):
      holder.set_state(state)

  return StateOf()


def data_item(iterator: Any, save: bool) -> dict:
  """``{"data": grain's orbax args}`` for a grain iterator, ``{}`` for None.

  Spread into an ``ocp.args.Composite`` of a save (``save=True``) or a
  restore, beside the state and metadata items.
  """
  if iterator is None:
    return {}
  try:
    from grain import checkpoint as grain_checkpoint  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data_iterator= is a grain iterator: pip install "
                      "'sharpjax[grain]'.") from e
  import grain  # pylint: disable=g-import-not-at-top
  if save:
    if not isinstance(iterator, grain.DatasetIterator):
      iterator = _StateOf(grain.DatasetIterator, iterator)
    return {"data": grain_checkpoint.CheckpointSave(iterator)}
  return {"data": grain_checkpoint.CheckpointRestore(iterator)}
