"""Writes the small intersphinx inventories the documentation links through.

The site must build with no network, so ``conf.py`` never downloads the
``objects.inv`` of Python, NumPy, JAX, optax or Flax. This script writes, for
each, an inventory of the names these pages and the docstrings' type hints
refer to, with the page each project documents it on (read from the
projects' own documentation sources: JAX's and optax's autosummary pages,
Flax's ``api_reference`` files). Run it after adding a name::

  python docs/_inventories/make_inventories.py

A name that is in no inventory is rendered as plain text, never as a broken
link and never as a build warning.
"""

from __future__ import annotations

import pathlib
import zlib

HERE = pathlib.Path(__file__).resolve().parent

# project -> (version, [(name, role, uri relative to the project's root)]).
# A uri ending in "#" is completed with the name.
_JAX_AUTOSUMMARY = "_autosummary/{}.html#"
INVENTORIES = {
    "python": ("3", [
        *[(n, "py:class", "library/functions.html#") for n in
          ("int", "float", "complex", "bool", "type", "object")],
        *[(n, "py:class", "library/stdtypes.html#") for n in
          ("str", "bytes", "tuple", "list", "dict")],
        ("None", "py:data", "library/constants.html#"),
        *[(f"typing.{n}", "py:data", "library/typing.html#") for n in
          ("Any", "Callable", "Optional", "Union")],
        *[(f"typing.{n}", "py:class", "library/typing.html#") for n in
          ("Sequence", "Mapping", "NamedTuple", "TextIO", "Iterator",
           "Iterable")],
        *[(f"collections.abc.{n}", "py:class",
           "library/collections.abc.html#") for n in
          ("Callable", "Sequence", "Mapping", "Iterator", "Iterable")],
        *[(n, "py:exception", "library/exceptions.html#") for n in
          ("ValueError", "TypeError", "KeyError", "FileNotFoundError",
           "RuntimeError", "KeyboardInterrupt")],
        ("argparse.ArgumentParser", "py:class", "library/argparse.html#"),
        ("pathlib.Path", "py:class", "library/pathlib.html#"),
        ("os.PathLike", "py:class", "library/os.html#"),
    ]),
    "numpy": ("stable", [
        ("numpy.ndarray", "py:class",
         "reference/generated/numpy.ndarray.html#"),
        ("numpy.dtype", "py:class", "reference/generated/numpy.dtype.html#"),
        ("numpy.number", "py:class", "reference/arrays.scalars.html#"),
        ("numpy.bool", "py:class", "reference/arrays.scalars.html#"),
        ("numpy.random.Generator", "py:class",
         "reference/random/generator.html#"),
    ]),
    "jax": ("latest", [
        *[(f"jax.{n}", "py:function", _JAX_AUTOSUMMARY.format(f"jax.{n}"))
          for n in ("jit", "grad", "value_and_grad", "vmap", "pmap",
                    "device_put", "block_until_ready", "make_mesh",
                    "devices", "local_devices", "device_count",
                    "process_index")],
        *[(f"jax.{n}", "py:class", _JAX_AUTOSUMMARY.format(f"jax.{n}"))
          for n in ("Array", "Device")],
        *[(f"jax.sharding.{n}", "py:class", "jax.sharding.html#")
          for n in ("Mesh", "NamedSharding", "PartitionSpec", "Sharding")],
        *[(f"jax.random.{n}", "py:function",
           _JAX_AUTOSUMMARY.format(f"jax.random.{n}"))
          for n in ("key", "PRNGKey", "split", "fold_in")],
        *[(f"jax.lax.{n}", "py:function",
           _JAX_AUTOSUMMARY.format(f"jax.lax.{n}"))
          for n in ("cond", "scan", "fori_loop", "map")],
        ("jax.numpy.float32", "py:class",
         _JAX_AUTOSUMMARY.format("jax.numpy.float32")),
        ("jax.distributed.initialize", "py:function",
         _JAX_AUTOSUMMARY.format("jax.distributed.initialize")),
        ("jax.tree.map", "py:function",
         _JAX_AUTOSUMMARY.format("jax.tree.map")),
    ]),
    # optax's pages are generated per name: api/generated/<full name>.html.
    "optax": ("latest", [
        *[(f"optax.{n}", "py:function", f"api/generated/optax.{n}.html#")
          for n in ("chain", "named_chain", "partition", "sgd", "adam",
                    "adamw", "clip_by_global_norm", "add_decayed_weights",
                    "masked", "apply_updates")],
        *[(f"optax.{n}", "py:class", f"api/generated/optax.{n}.html#")
          for n in ("GradientTransformation",
                    "GradientTransformationExtraArgs", "MultiSteps",
                    "OptState", "Params")],
        ("optax.contrib.sam", "py:function",
         "api/generated/optax.contrib.sam.html#"),
        *[(f"optax.schedules.{n}", "py:function",
           f"api/generated/optax.schedules.{n}.html#")
          for n in ("inject_hyperparams", "cosine_decay_schedule",
                    "warmup_cosine_decay_schedule", "linear_schedule")],
        ("optax.schedules.Schedule", "py:class",
         "api/generated/optax.schedules.Schedule.html#"),
        *[(f"optax.losses.{n}", "py:function",
           f"api/generated/optax.losses.{n}.html#")
          for n in ("softmax_cross_entropy",
                    "softmax_cross_entropy_with_integer_labels",
                    "kl_divergence")],
        # The top-level aliases users write, on the same pages.
        ("optax.inject_hyperparams", "py:function",
         "api/generated/optax.schedules.inject_hyperparams.html"
         "#optax.schedules.inject_hyperparams"),
        ("optax.Schedule", "py:class",
         "api/generated/optax.schedules.Schedule.html"
         "#optax.schedules.Schedule"),
        ("optax.softmax_cross_entropy_with_integer_labels", "py:function",
         "api/generated/optax.losses.softmax_cross_entropy_with_integer_labels"
         ".html#optax.losses.softmax_cross_entropy_with_integer_labels"),
    ]),
    # flax.readthedocs.io documents Flax NNX ...
    "flax": ("latest", [
        ("flax.nnx.Module", "py:class",
         "api_reference/flax.nnx/module.html#"),
        ("flax.nnx.Rngs", "py:class", "api_reference/flax.nnx/rnglib.html#"),
        *[(f"flax.nnx.{n}", "py:class",
           "api_reference/flax.nnx/variables.html#")
          for n in ("Param", "BatchStat", "Variable")],
        *[(f"flax.nnx.{n}", "py:class",
           "api_reference/flax.nnx/nn/normalization.html#")
          for n in ("BatchNorm", "LayerNorm", "GroupNorm")],
    ]),
    # ... and flax-linen.readthedocs.io Flax Linen.
    "flax_linen": ("latest", [
        ("flax.linen.Module", "py:class",
         "api_reference/flax.linen/module.html#"),
        *[(f"flax.linen.{n}", "py:class",
           "api_reference/flax.linen/layers.html#")
          for n in ("Dense", "Conv", "BatchNorm", "LayerNorm", "GroupNorm",
                    "Dropout", "MultiHeadDotProductAttention")],
    ]),
}


def inventory_bytes(project: str, version: str, entries) -> bytes:
  lines = []
  for name, role, uri in sorted(entries):
    if uri.endswith("#"):
      uri += "$"  # the format's shorthand for the name itself
    lines.append(f"{name} {role} 1 {uri} -\n")
  header = ("# Sphinx inventory version 2\n"
            f"# Project: {project}\n"
            f"# Version: {version}\n"
            "# The remainder of this file is compressed using zlib.\n")
  return header.encode() + zlib.compress("".join(lines).encode())


def main():
  for project, (version, entries) in INVENTORIES.items():
    path = HERE / f"{project}.inv"
    path.write_bytes(inventory_bytes(project, version, entries))
    print(f"{path.relative_to(HERE.parent.parent)}: {len(entries)} names")


if __name__ == "__main__":
  main()
