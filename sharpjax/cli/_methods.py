"""The method registry: one entry per training method of the command line.

A :class:`Method` knows its hyper-parameters with their defaults and builds
the sharpjax transformation that goes in front of the base optimizer (None for
plain SGD). Its summary, cost, paper and defaults come from the method's card
in :mod:`sharpjax._src.registry` (the defaults from the constructor's
signature), so the command line cannot drift from the library. Adding a
variant is a card there and one :func:`_register` line at the bottom of this
module.

Hyper-parameters resolve in this order: the method's default, then a global
flag (``--rho``, ``--strength``, ...) if the method has that parameter, then a
``--set METHOD.PARAM=VALUE`` override. The value ``"auto"`` is resolved from
the run's budget (:class:`Budget`) by :func:`resolve`:

- SAF ``start_epoch`` = ``max(1, epochs // 6)`` and ``delay_epochs`` =
  ``clip(epochs // 10, 1, 3)``: the paper's 5 and 3 at 30 epochs, scaled down
  for shorter runs so the penalty is on for most of training. (The paper's
  CIFAR runs are 200 epochs; its 5/3 would leave a 10-epoch run almost
  unregularised.) The penalty starts at epoch ``max(start_epoch,
  delay_epochs)``, the first with a recorded target.
- MESA ``start_epoch`` as SAF's; ``decay`` such that the EMA horizon
  ``1 / (1 - decay)`` is 1/16 of the run's steps, the paper's share
  (0.9998, a 5,000-step horizon, in a 78,000-step CIFAR run). The paper's
  0.9998 in a 1,000-step run would keep the teacher at the initialisation.
- SSAM ``update_every`` = one epoch of steps (the paper refreshes the mask
  every 1 to 5 epochs); AUSAM ``transition_steps`` = 15% of the run (the
  paper's 30 of 200 epochs).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, Optional

import optax

import sharpjax as sj
from sharpjax._src import registry

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a method may need to know about the run to be built.

  Attributes:
    num_examples: training-set size (SAF's bank rows, AUSAM's score table).
    num_classes: number of classes (SAF's bank width).
    steps_per_epoch: optimizer steps per epoch.
    epochs: number of epochs of the run.
    seed: the run's seed (for methods that keep a PRNG key).
    learning_rate: the base optimizer's learning rate (a number or an optax
      schedule), for methods that form the base step themselves (SAMPa).
    momentum: the base optimizer's SGD momentum (0: none).
    weight_decay: the base optimizer's weight decay (0: none).
  """

  num_examples: int
  num_classes: int
  steps_per_epoch: int
  epochs: int
  seed: int = 0
  learning_rate: Any = None
  momentum: float = 0.0
  weight_decay: float = 0.0

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.epochs


Hyper = Mapping[str, Any]
Builder = Callable[[Hyper, Budget], Optional[optax.GradientTransformation]]


@dataclasses.dataclass(frozen=True)
class Method:
  """One entry of the registry.

  Attributes:
    name: the command-line name (``--methods NAME``).
    summary: one line for ``--help``: what it is and its cost per step.
    defaults: hyper-parameter name -> default (``"auto"``: from the budget).
    build: ``build(hyper, budget)`` -> the transformation chained in front of
      the base optimizer, or None (plain SGD).
    reference: "Author et al., Title, venue year", for the report.
  """

  name: str
  summary: str
  defaults: Mapping[str, Any]
  build: Builder
  reference: str = ""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` to the registry (its name must be new)."""
  if method.name in _REGISTRY:
    raise ValueError(f"method {method.name!r} is already registered.")
  _REGISTRY[method.name] = method
  return method


def names() -> list[str]:
  """Registered method names, in registration order."""
  return list(_REGISTRY)


def unknown_name_message(kind: str, name: str, valid) -> str:
  """``unknown method 'x'; valid: a, b (did you mean ...?)``."""
  valid = list(valid)
  msg = f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}"
  close = difflib.get_close_matches(name, valid, n=1)
  if close:
    msg += f" (did you mean {close[0]!r}?)"
  return msg + "."


def get(name: str) -> Method:
  """The registered method ``name``; a ``ValueError`` lists the valid ones."""
  if name not in _REGISTRY:
    raise ValueError(unknown_name_message("method", name, _REGISTRY))
  return _REGISTRY[name]


def all_hyper_names() -> list[str]:
  """Every hyper-parameter name any registered method has (sorted)."""
  return sorted({k for m in _REGISTRY.values() for k in m.defaults})


def resolve(method: Method, budget: Budget, flags: Mapping[str, Any],
            overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The method's hyper-parameters for this run, ``"auto"`` resolved.

  Args:
    method: the registry entry.
    budget: the run's budget.
    flags: global flag values (``None``: not given); only the names the
      method has are used.
    overrides: ``PARAM -> value`` from ``--set METHOD.PARAM=VALUE``; a name
      the method does not have raises ``ValueError`` listing the valid ones.

  Returns:
    ``PARAM -> value`` with every default replaced as described in the module
    docstring.
  """
  hyper = dict(method.defaults)
  for k, v in flags.items():
    if k in hyper and v is not None:
      hyper[k] = v
  for k, v in overrides.items():
    if k not in hyper:
      valid = ", ".join(sorted(hyper)) or "(none)"
      raise ValueError(
          f"method {method.name!r} has no hyper-parameter {k!r}; its "
          f"hyper-parameters are: {valid}.")
    hyper[k] = v
  e, spe = budget.epochs, budget.steps_per_epoch
  auto = {
      "start_epoch": max(1, e // 6),
      "delay_epochs": min(3, max(1, e // 10)),
      "decay": sj.mesa_auto_decay(max(1, budget.total_steps)),
      "update_every": spe,
      "transition_steps": int(round(0.15 * budget.total_steps)),
  }
  for k, v in hyper.items():
    if isinstance(v, str) and v == AUTO:
      if k not in auto:
        raise ValueError(f"{method.name}.{k}: 'auto' is not supported.")
      hyper[k] = auto[k]
  for k in ("start_epoch", "delay_epochs", "update_every", "transition_steps",
            "k", "num_chunks", "num_fisher_samples"):
    if k in hyper:
      v = hyper[k]
      if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{method.name}.{k} must be an integer, got {v!r}.")
      hyper[k] = int(v)
  return hyper


def build(method: Method, hyper: Hyper,
          budget: Budget) -> Optional[optax.GradientTransformation]:
  """``method.build(hyper, budget)``; a refused value names the method.

  The library's ``ValueError`` (out of range) and ``TypeError`` (not a
  number) become one ``ValueError`` prefixed by the method's name.
  """
  try:
    return method.build(hyper, budget)
  except (ValueError, TypeError) as e:
    raise ValueError(f"method {method.name!r}: {e}") from e


# ---------------------------------------------------------------------------
# The entries: each method's card (sharpjax._src.registry: summary, cost,
# papers, and the defaults from its constructor's signature), the
# hyper-parameters the run's budget sets ("auto"), and how to build it.
# ---------------------------------------------------------------------------


def _register(name: str, build: Builder, auto: tuple[str, ...] = ()) -> None:
  card = registry.card(name)
  defaults = card.defaults()
  defaults.update({k: AUTO for k in auto})
  papers = card.papers[:1]
  register(Method(name, f"{card.summary} ({card.cost})", defaults, build,
                  papers[0].citation if papers else ""))


_register("sgd", lambda h, b: None)
_register("sam", lambda h, b: sj.sam(rho=h["rho"]))
_register("asam", lambda h, b: sj.asam(rho=h["rho"], eta=h["eta"]))
_register("gsam", lambda h, b: sj.gsam(rho=h["rho"], alpha=h["alpha"]))
_register("looksam",
          lambda h, b: sj.looksam(rho=h["rho"], k=h["k"], alpha=h["alpha"]))
_register("fsam",
          lambda h, b: sj.fsam(rho=h["rho"], sigma=h["sigma"], lam=h["lam"]))
_register("msam",
          lambda h, b: sj.msam(rho=h["rho"], num_chunks=h["num_chunks"]))
_register("esam", lambda h, b: sj.esam(rho=h["rho"], beta=h["beta"],
                                       gamma=h["gamma"], seed=b.seed))
_register("ssam", lambda h, b: sj.ssam(
    rho=h["rho"], sparsity=h["sparsity"], mask=h["mask"],
    num_fisher_samples=h["num_fisher_samples"],
    update_every=h["update_every"], seed=b.seed), auto=("update_every",))
_register("ausam", lambda h, b: sj.ausam(
    rho=h["rho"], keep=h["keep"], f_min=h["f_min"], f_max=h["f_max"],
    transition_steps=h["transition_steps"], num_examples=b.num_examples,
    seed=b.seed), auto=("transition_steps",))
_register("sagm", lambda h, b: sj.sagm(rho=h["rho"], alpha=h["alpha"]))
# Momentum-SAM's buffer is the base optimizer's momentum: the run's.
_register("momentum_sam", lambda h, b: sj.momentum_sam(
    rho=h["rho"], momentum=b.momentum))
# SAMPa's auxiliary point is the base optimizer's step (the official code's,
# with SGD's momentum and weight decay), so it is built from the run's.
_register("sampa", lambda h, b: sj.sampa(
    rho=h["rho"], lam=h["lam"], learning_rate=b.learning_rate,
    momentum=b.momentum, weight_decay=b.weight_decay))
_register("late_sam", lambda h, b: sj.late_sam(
    rho=h["rho"], start=h["start"], total_steps=max(1, b.total_steps)))
_register("saf", lambda h, b: sj.saf(
    num_examples=b.num_examples, num_classes=b.num_classes,
    steps_per_epoch=b.steps_per_epoch, delay_epochs=h["delay_epochs"],
    temperature=h["temperature"], strength=h["strength"],
    start_epoch=h["start_epoch"]), auto=("delay_epochs", "start_epoch"))
_register("mesa", lambda h, b: sj.mesa(
    decay=h["decay"], temperature=h["temperature"], strength=h["strength"],
    start_epoch=h["start_epoch"], steps_per_epoch=b.steps_per_epoch),
          auto=("decay", "start_epoch"))
