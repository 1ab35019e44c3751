"""``sharpjax train --config NAME_OR_PATH[:ARG]`` and ``sharpjax recipes``.

A config is an ``ml_collections`` ``ConfigDict`` (or a plain dict) whose keys
are ``sharpjax train``'s own names: a flag ``--batch-size`` is the key
``batch_size``, a method's hyper-parameter flag ``--rho`` is ``hyper.rho``,
``--set`` is ``set`` (a list). It comes from

- a recipe of :mod:`sharpjax.configs` by name (``cifar10_wrn28_10_saf``),
- a Python file with ``get_config(arg=None)`` (big_vision's and the flax
  examples' convention), or
- a ``.json`` file, such as the ``config.json`` a run writes (so a run is
  repeated with ``--config OUT/config.json``).

``:ARG`` is passed to ``get_config`` (the recipes take ``runlocal``).
``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) then sets one key, typed
like the value it replaces. The config becomes the command's defaults: its
keys are turned into their flags, placed before the command line's own
flags, so that argparse and the command's range checks see them as if typed
(an explicit flag after them wins). The resolved settings, every key with
the value the run used, are written to ``OUT/config.json`` and into
``train.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
from typing import Any, Optional, Sequence

from sharpjax.cli import _validate

HYPER = "hyper"
# Flags that say what to do with a run rather than what the run is.
_NOT_SETTINGS = ("help", "config", "resume", "step", "profile_steps")


class ConfigError(ValueError):
  """A config that cannot be loaded or a key it cannot take."""


def _train_actions(train_parser: argparse.ArgumentParser) -> dict:
  """``{config key: argparse action}`` of ``sharpjax train``."""
  out = {}
  for action in train_parser._actions:  # pylint: disable=protected-access
    if action.dest in _NOT_SETTINGS or not action.option_strings:
      continue
    key = action.dest
    if key.startswith("hp_"):
      key = f"{HYPER}.{key[3:]}"
    out[key] = action
  return out


def split_argv(argv: Sequence[str]):
  """``(spec, [(key, text)], rest)``: the ``--config`` parts of ``argv``."""
  spec, overrides, rest = None, [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" or a.startswith("--config="):
      if a == "--config":
        if i + 1 >= len(argv):
          raise ConfigError("--config expects NAME_OR_PATH[:ARG].")
        i += 1
        value = argv[i]
      else:
        value = a.split("=", 1)[1]
      if spec is not None:
        raise ConfigError("--config is given twice.")
      spec = value
    elif a.startswith("--config."):
      key = a[len("--config."):]
      if "=" in key:
        key, text = key.split("=", 1)
      elif i + 1 < len(argv):
        i += 1
        text = argv[i]
      else:
        raise ConfigError(f"{a} expects a value (--config.KEY=VALUE).")
      overrides.append((key, text))
    else:
      rest.append(a)
    i += 1
  if overrides and spec is None:
    raise ConfigError(f"--config.{overrides[0][0]} changes a config: give "
                      "--config NAME_OR_PATH too (or use the flag "
                      f"--{overrides[0][0].split('.')[-1].replace('_', '-')}).")
  return spec, overrides, rest


def _split_spec(spec: str) -> tuple[str, Optional[str]]:
  if os.path.exists(spec) or ":" not in spec:
    return spec, None
  where, arg = spec.rsplit(":", 1)
  return where, arg


def load(spec: str) -> tuple[dict, str, Optional[str]]:
  """``(config as a nested dict, name or path, arg)`` of ``--config SPEC``."""
  where, arg = _split_spec(spec)
  if where.endswith(".json"):
    if arg is not None:
      raise ConfigError(f"--config {spec}: a .json config takes no :ARG.")
    try:
      with open(where) as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"--config {where}: cannot read it ({e}).") from None
  elif where.endswith(".py") or os.sep in where:
    if not os.path.exists(where):
      raise ConfigError(f"--config {where}: no such file.")
    try:
      module_spec = importlib.util.spec_from_file_location(
          "sharpjax_user_config", where)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      get = getattr(module, "get_config")
      config = get(arg) if arg is not None else get()
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # The user's file: a syntax error, a missing get_config, its own raise.
      text = str(e).strip().splitlines()
      raise ConfigError(f"--config {spec}: {type(e).__name__}: "
                        f"{text[0] if text else ''}") from None
  else:
    from sharpjax import configs  # pylint: disable=g-import-not-at-top
    try:
      config = configs.get_config(where, arg)
    except ImportError as e:
      raise ConfigError(f"--config needs ml_collections: pip install "
                        f"'sharpjax[cli]' ({e}).") from None
    except ValueError as e:  # no such recipe, an argument it does not take
      raise ConfigError(f"--config {spec}: {e}") from None
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, dict):
    raise ConfigError(f"--config {spec}: get_config returned a "
                      f"{type(config).__name__}, not a ConfigDict or dict.")
  return config, where, arg


def _flat(config: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _unknown(key: str, actions: dict) -> ConfigError:
  near = [k for k in actions if k.split(".")[-1] == key.split(".")[-1]]
  hint = (f" (did you mean {near[0]}?)" if near else
          "; the keys are sharpjax train's flags with _ for - (batch_size, "
          "data_dir, ...) and hyper.NAME for a method's hyper-parameter")
  return ConfigError(f"config key {key!r} is not a setting of sharpjax "
                     f"train{hint}.")


def _typed(key: str, text: str, current: Any, action) -> Any:
  if text.lower() in ("none", "null"):
    return None
  if isinstance(action, (argparse._StoreTrueAction,  # pylint: disable=protected-access
                         argparse._StoreFalseAction)):  # pylint: disable=protected-access
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false.")
  if isinstance(current, bool):
    raise ConfigError(f"--config.{key}: a boolean key; use true or false.")
  try:
    if isinstance(current, float):
      return float(text)
    if isinstance(current, int):
      return int(text)
  except ValueError:
    raise ConfigError(f"--config.{key}={text}: expected "
                      f"{type(current).__name__} like {current!r}.") from None
  if isinstance(current, str):
    return text
  if isinstance(current, list):
    return [t for t in text.split(",") if t]
  return _validate.parse_value(text)


def _to_argv(flat: dict, actions: dict) -> list[str]:
  argv = []
  for key, value in flat.items():
    action = actions[key]
    flag = action.option_strings[-1] if key.startswith(HYPER) else max(
        action.option_strings, key=len)
    if value is None:
      continue
    if isinstance(action, argparse._StoreTrueAction):  # pylint: disable=protected-access
      if not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} is true or false, got "
                          f"{value!r}.")
      argv += [flag] if value else []
    elif isinstance(action, argparse._AppendAction):  # pylint: disable=protected-access
      values = value if isinstance(value, (list, tuple)) else [value]
      for v in values:
        argv += [flag, str(v)]
    elif isinstance(value, (dict, list, tuple)):
      raise ConfigError(f"config key {key!r} takes one value, got {value!r}.")
    else:
      argv.append(f"{flag}={value!r}" if isinstance(value, float)
                  else f"{flag}={value}")
  return argv


def train_subparser(parser: argparse.ArgumentParser):
  """The ``train`` subparser of the ``sharpjax`` parser (or ``parser``)."""
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      return action.choices["train"]
  return parser


def expand(argv: Sequence[str], parser: argparse.ArgumentParser):
  """``(argv for argparse, info)``: ``--config`` turned into flags.

  ``info`` is None without ``--config``, else ``{"config": spec, "name":
  name or path, "arg": arg, "overrides": {key: value}}``.
  """
  spec, overrides, rest = split_argv(argv)
  if spec is None:
    return list(argv), None
  if not argv or argv[0] != "train":
    raise ConfigError("--config is an option of `sharpjax train`.")
  actions = _train_actions(train_subparser(parser))
  config, where, arg = load(spec)
  flat = _flat(config)
  for key in flat:
    if key not in actions:
      raise _unknown(key, actions)
  applied = {}
  for key, text in overrides:
    if key not in actions:
      raise _unknown(key, actions)
    value = _typed(key, text, flat.get(key, actions[key].default),
                   actions[key])
    flat[key] = applied[key] = value
  info = {"config": spec, "name": where, "arg": arg, "overrides": applied}
  return [rest[0]] + _to_argv(flat, actions) + rest[1:], info


def resolved(args: argparse.Namespace,
             train_parser: argparse.ArgumentParser) -> dict:
  """Every setting of the run as a nested config (``hyper`` for methods')."""
  out: dict = {HYPER: {}}
  for key, action in _train_actions(train_parser).items():
    value = getattr(args, action.dest, None)
    if key.startswith(HYPER + "."):
      if value is not None:
        out[HYPER][key.split(".", 1)[1]] = value
    else:
      out[key] = value
  return out


def write(args, train_parser, out_dir: str) -> dict:
  """Writes ``OUT/config.json`` (process 0); returns what train.json keeps."""
  import jax  # pylint: disable=g-import-not-at-top
  from sharpjax.cli import _report  # pylint: disable=g-import-not-at-top
  settings = resolved(args, train_subparser(train_parser))
  record = {"from": getattr(args, "config_info", None), "resolved": settings}
  if jax.process_index() == 0:
    _report.write_json(os.path.join(out_dir, "config.json"), settings)
  return record


# ---------------------------------------------------------------------------
# sharpjax recipes
# ---------------------------------------------------------------------------


def add_recipes_command(sub, fmt) -> None:
  r = sub.add_parser(
      "recipes", formatter_class=fmt,
      help="the papers' runs as configs for `sharpjax train --config`",
      description=textwrap.fill(
          "Lists the recipes of sharpjax.configs: the paper and table each "
          "reproduces and the accuracy to reach. Run one with `sharpjax "
          "train --config NAME [--data-dir DIR]`, or a tiny version of it "
          "with `--config NAME:runlocal`; `--config.KEY=VALUE` changes one "
          "setting."))
  r.add_argument("name", nargs="?", default=None,
                 help="show this recipe's settings and notes")


def cmd_recipes(args) -> int:
  from sharpjax import configs  # pylint: disable=g-import-not-at-top
  if args.name is not None:
    recipe = configs.get_recipe(args.name)
    print(recipe.name)
    print(textwrap.fill(recipe.doc, 79))
    print()
    print(json.dumps(recipe.settings, indent=1))
    return 0
  width = max(len(n) for n in configs.RECIPES)
  for name, r in configs.RECIPES.items():
    print(f"{name:{width}s}  {r.table}")
    print(textwrap.fill(f"{r.paper}; reach {r.target}", 79,
                        initial_indent=" " * (width + 2),
                        subsequent_indent=" " * (width + 2)))
  print(f"\n{len(configs.RECIPES)} recipes. `sharpjax recipes NAME` shows "
        "one's settings; `sharpjax train --config NAME:runlocal` runs a tiny "
        "version.", file=sys.stdout)
  return 0

