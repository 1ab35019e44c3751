"""Recipes: the papers' runs as ``sharpjax train --config`` files.

Each recipe is a ``get_config(arg=None)`` returning an ``ml_collections``
``ConfigDict`` whose keys are ``sharpjax train``'s own names (``--batch-size``
is ``batch_size``; a method's hyper-parameter ``--rho`` is ``hyper.rho``), the
convention of big_vision's and the flax examples' configs. ``arg`` is
``runlocal`` (a few steps of a tiny model on tiny data, for a laptop) or
None. Names say data, model and method: ``cifar10_wrn28_10_saf``.

``sharpjax recipes`` lists them with the paper and table each reproduces;
each one's docstring gives the accuracy the paper reports and its hardware.

Example:
  >>> from sharpjax import configs
  >>> config = configs.get_config("cifar10_wrn28_10_saf")
  >>> config.method, config.epochs, config.batch_size, config.hyper.strength
  ('saf', 200, 128, 0.3)
"""

from sharpjax.configs._recipes import get_config
from sharpjax.configs._recipes import get_recipe
from sharpjax.configs._recipes import Recipe
from sharpjax.configs._recipes import RECIPES
from sharpjax.configs._recipes import runlocal

globals().update({name: r.get_config for name, r in RECIPES.items()})

__all__ = ["RECIPES", "Recipe", "get_config", "get_recipe", "runlocal",
           *RECIPES]
