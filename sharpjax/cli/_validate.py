"""Every value of the command line checked in one place, before any work.

:func:`check` runs right after argparse: each numeric flag against its
allowed range (:data:`RANGES`), the data directory, the flags that only make
sense together. :func:`overrides` parses ``--set METHOD.PARAM=VALUE`` against
the method registry, and says once when a hyper-parameter flag reaches none of
the selected methods. A bad value raises ``ValueError`` with one sentence that
names the flag and what it accepts; ``main`` prints it as one line on stderr
and exits with status 2. The library's own checks (a method's
hyper-parameters, given through ``--rho`` or ``--set``) are the second line:
their ``ValueError`` / ``TypeError`` become the same one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence, Union

from sharpjax.cli import _methods
from sharpjax.cli import _setup

# Data sets read from --data-dir (the others are generated or bundled).
DATA_FROM_DISK = ("cifar10", "cifar100", "arrayrecord")

Bound = Union[float, Callable[[argparse.Namespace], float], None]


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a numeric flag accepts: ``[low, high]``, ends open or closed.

  ``high`` may be a function of the parsed arguments (``--warmup-epochs`` is
  below ``--epochs``). ``None`` (the flag left unset) is always accepted.
  """

  low: Bound = None
  high: Bound = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def describe(self, args: argparse.Namespace) -> str:
    low, high = _value(self.low, args), _value(self.high, args)
    what = "an integer" if self.integer else "a finite number"
    if high is None:
      return f"{what} {'>' if self.low_open else '>='} {_show(low)}"
    return (f"{what} in {'(' if self.low_open else '['}{_show(low)}, "
            f"{_show(high)}{')' if self.high_open else ']'}")

  def accepts(self, value: float, args: argparse.Namespace) -> bool:
    if not math.isfinite(value):
      return False
    low, high = _value(self.low, args), _value(self.high, args)
    if low is not None and (value <= low if self.low_open else value < low):
      return False
    if high is not None and (value >= high if self.high_open
                             else value > high):
      return False
    return True


def _value(bound: Bound, args) -> Optional[float]:
  return bound(args) if callable(bound) else bound


def _show(x: float) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


def _int(low: int) -> Range:
  return Range(low=low, integer=True)


_PROPORTION = Range(0.0, 1.0)
_DATA_AND_BUDGET = {
    "num_examples": _int(10),
    "label_noise": _PROPORTION,
    "width": _int(1),
    "batch_size": _int(1),
    "epochs": _int(1),
    "lr": Range(low=0.0, low_open=True),
    "momentum": Range(0.0, 1.0, high_open=True),
    "weight_decay": Range(low=0.0),
    "warmup_epochs": Range(0, lambda a: a.epochs, high_open=True,
                           integer=True),
    "image_size": _int(8),
    # Where it runs (sharpjax/cli/_devices.py; --devices is also checked
    # against the devices there are, once JAX knows them).
    "devices": _int(1),
    "loader_workers": _int(0),
}

# command -> argparse destination -> allowed range.
RANGES: dict[str, dict[str, Range]] = {
    "compare": {**_DATA_AND_BUDGET, "seeds": _int(1),
                "sharpness_examples": _int(1), "trace_probes": _int(0)},
    "train": {**_DATA_AND_BUDGET, "seed": _int(0), "save_every": _int(1),
              "keep_checkpoints": _int(1), "max_steps": _int(1),
              "step": _int(0)},
    "measure": {"step": _int(0), "num_examples": _int(1), "top_k": _int(1),
                "probes": _int(1), "seed": _int(0)},
}


def flag(dest: str) -> str:
  """``"warmup_epochs"`` -> ``"--warmup-epochs"``."""
  return "--" + dest.replace("_", "-")


def check(args: argparse.Namespace) -> None:
  """Raises ``ValueError`` for the first value of ``args`` out of its range.

  Compare's preset must already be applied (its flags default to None).
  """
  for dest, rng in RANGES.get(args.command, {}).items():
    v = getattr(args, dest, None)
    if v is None:
      continue
    if not rng.accepts(float(v), args):
      raise ValueError(f"{flag(dest)} must be {rng.describe(args)}, got "
                       f"{v!r}.")
  for name in _methods.all_hyper_names():
    v = getattr(args, "hp_" + name, None)
    if isinstance(v, float) and not math.isfinite(v):
      raise ValueError(f"{flag(name)} must be a finite number, got {v!r}.")
  if args.command in ("compare", "train"):
    _check_data_dir(args)
    _check_image_size(args)
    _resolve_loader(args)
  if args.command == "train":
    from sharpjax.cli import _profile  # pylint: disable=g-import-not-at-top
    _profile.parse(args.profile_steps)
  if args.command == "train" and args.step is not None and not args.resume:
    raise ValueError("--step chooses the checkpoint to resume from: it needs "
                     "--resume.")


def _check_image_size(args) -> None:
  if getattr(args, "image_size", None) is not None and (
      args.data != "arrayrecord"):
    raise ValueError(f"--image-size sets the resolution of converted image "
                     f"records (--data arrayrecord); --data {args.data} has "
                     "its own: remove --image-size.")


def _resolve_loader(args) -> None:
  """``--loader``'s default: grain for converted records, else numpy."""
  if args.data == "arrayrecord":
    if args.loader == "numpy":
      raise ValueError("--data arrayrecord is read through grain (its "
                       "decoding runs in grain's workers): drop --loader "
                       "numpy.")
    args.loader = "grain"
  elif args.loader is None:
    args.loader = "numpy"


def _check_data_dir(args) -> None:
  if args.data not in _setup.DATA:
    return  # the unknown name is reported with the valid ones
  if args.data == "arrayrecord" and args.data_dir is None:
    raise ValueError("--data arrayrecord reads the shards that `sharpjax data "
                     "convert` wrote: pass --data-dir DIR.")
  if args.data in DATA_FROM_DISK:
    if args.data_dir is None:
      raise ValueError(
          f"--data {args.data} reads the data from disk: pass --data-dir DIR "
          "(the python-pickle release or a .npz; see sharpjax.data."
          "load_cifar). Nothing is downloaded.")
    if not os.path.isdir(args.data_dir):
      raise ValueError(f"--data-dir {args.data_dir}: no such directory.")
  elif args.data_dir is not None:
    raise ValueError(
        f"--data-dir is read only by --data {' or '.join(DATA_FROM_DISK)}; "
        f"{args.data} is generated or bundled, so it would be ignored: remove "
        "--data-dir.")


# ---------------------------------------------------------------------------
# Hyper-parameters: --set and the global flags.
# ---------------------------------------------------------------------------


def parse_value(text: str) -> Any:
  """``"auto"``, an int, a float, else the string itself."""
  if text == _methods.AUTO:
    return text
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def overrides(args: argparse.Namespace, methods: Sequence[str]) -> dict:
  """``{method: {param: value}}`` from ``--set METHOD.PARAM=VALUE``.

  Also warns once (stderr) for each global hyper-parameter flag that none of
  ``methods`` has (``--rho`` given to sgd).

  Raises:
    ValueError: a malformed item, a method not selected, a parameter the
      method does not have, or a value of the wrong kind (a word where the
      default is a number).
  """
  out: dict = {}
  for item in args.set:
    if "=" not in item or "." not in item.split("=", 1)[0]:
      raise ValueError(f"--set expects METHOD.PARAM=VALUE, got {item!r}.")
    key, text = item.split("=", 1)
    method, param = key.split(".", 1)
    m = _methods.get(method)
    if method not in methods:
      raise ValueError(f"--set {item}: method {method!r} is not selected "
                       f"({', '.join(methods)}).")
    if param not in m.defaults:
      valid = ", ".join(sorted(m.defaults)) or "(none)"
      raise ValueError(
          f"--set {item}: method {method!r} has no hyper-parameter {param!r}; "
          f"its hyper-parameters are: {valid}.")
    value, default = parse_value(text), m.defaults[param]
    numeric = _is_number(default) or default == _methods.AUTO
    if numeric and not (_is_number(value) or value == _methods.AUTO):
      auto = " or auto" if default == _methods.AUTO else ""
      raise ValueError(f"--set {item}: {method}.{param} takes a number{auto}, "
                       f"got {text!r}.")
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"--set {item}: {method}.{param} must be finite.")
    out.setdefault(method, {})[param] = value
  _warn_unused_flags(args, methods)
  return out


def _warn_unused_flags(args, methods: Sequence[str]) -> None:
  for name in _methods.all_hyper_names():
    if getattr(args, "hp_" + name, None) is None:
      continue
    if not any(name in _methods.get(m).defaults for m in methods):
      users = [m for m in _methods.names() if name in _methods.get(m).defaults]
      print(f"sharpjax {args.command}: warning: {flag(name)} is ignored: "
            f"{', '.join(methods)} {'has' if len(methods) == 1 else 'have'} "
            f"no {name} (it is a hyper-parameter of {', '.join(users)}).",
            file=sys.stderr, flush=True)
