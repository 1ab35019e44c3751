"""Type hints that link to the public name, not the defining module.

autodoc writes a type hint as the class's ``__module__`` path, which for the
libraries sharpjax builds on is private: ``jax.Array`` is
``jaxlib._jax.Array``, ``optax.GradientTransformationExtraArgs`` is
``optax._src.base.GradientTransformationExtraArgs``. On a reference that
nothing resolved, this extension rewrites the target (and the text, when it
shows the private path) to the public name and resolves it again through
this site's own entries and the intersphinx inventories. What stays unknown
stays plain text. It also writes the defaults of Flax modules' dataclass
fields as they read in the source (``jnp.float32``).
"""

from __future__ import annotations

import re

from docutils import nodes
from sphinx.ext import intersphinx

PUBLIC_NAMES = {
    "jax.jaxlib._jax.Array": "jax.Array",
    "jaxlib._jax.Array": "jax.Array",
    "jaxlib.xla_extension.ArrayImpl": "jax.Array",
    "jaxlib._jax.Device": "jax.Device",
    "jax._src.mesh.Mesh": "jax.sharding.Mesh",
    "jax._src.sharding_impls.NamedSharding": "jax.sharding.NamedSharding",
    "jax._src.partition_spec.PartitionSpec": "jax.sharding.PartitionSpec",
    "optax._src.base.GradientTransformation": "optax.GradientTransformation",
    "optax._src.base.GradientTransformationExtraArgs":
        "optax.GradientTransformationExtraArgs",
    "flax.linen.module.Module": "flax.linen.Module",
    "flax.nnx.module.Module": "flax.nnx.Module",
    "numpy.random._generator.Generator": "numpy.random.Generator",
    # Unqualified names from string annotations.
    "Any": "typing.Any",
    "Callable": "collections.abc.Callable",
    "Sequence": "collections.abc.Sequence",
    "Mapping": "collections.abc.Mapping",
    "Optional": "typing.Optional",
}


def public_name(target: str) -> str | None:
  if target in PUBLIC_NAMES:
    return PUBLIC_NAMES[target]
  parts = target.split(".")
  # sharpjax._src.module.Name -> sharpjax.Name (the re-export).
  if parts[0] == "sharpjax" and "_src" in parts:
    return f"sharpjax.{parts[-1]}"
  return None


def _missing_reference(app, env, node, contnode):
  if node.get("refdomain") != "py":
    return None
  old = node.get("reftarget", "")
  new = public_name(old)
  if new is None:
    return None
  if contnode.astext() == old:
    if isinstance(contnode, nodes.Text):
      contnode = nodes.Text(new)
    else:
      contnode = contnode.deepcopy()
      contnode.children = [nodes.Text(new)]
  node = node.deepcopy()
  node["reftarget"] = new
  domain = env.domains["py"]
  found = domain.resolve_xref(env, node.get("refdoc", ""), app.builder,
                              node["reftype"], new, node, contnode)
  if found is not None:
    return found
  return intersphinx.missing_reference(app, env, node, contnode)


_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")
_FLAX_PARENT = re.compile(r",\s*parent=<flax\.linen\.module\._Sentinel object>")
_SHORT = {"jax.numpy.": "jnp.", "numpy.": "np."}


def _class_name(match: re.Match) -> str:
  name = match.group(1)
  for prefix, short in _SHORT.items():
    if name.startswith(prefix):
      return short + name[len(prefix):]
  return name


def _process_signature(app, what, name, obj, options, signature,
                       return_annotation):
  """Defaults that autodoc could not take from the source (the fields of a
  Flax module's dataclass) as written, not as their repr: ``jnp.float32``
  instead of ``<class 'jax.numpy.float32'>``; Flax's internal ``parent``
  sentinel left out."""
  if signature:
    signature = _FLAX_PARENT.sub("", _CLASS_REPR.sub(_class_name, signature))
  return signature, return_annotation


def _exported(target: str) -> str | None:
  """``sharpjax.Name`` for ``sharpjax._src.module.Name`` when sharpjax
  exports that name (the public path of a private type), else None."""
  parts = target.split(".")
  if parts[0] != "sharpjax" or "_src" not in parts:
    return None
  import sharpjax  # pylint: disable=g-import-not-at-top
  if getattr(sharpjax, parts[-1], None) is None:
    return None
  return f"sharpjax.{parts[-1]}"


def _publish_private_paths(app, doctree):
  """References written with a private path (autodoc's field types, such as
  a state's ``diagnostics: sharpjax._src.perturbed.Diagnostics``) point to
  and read as the exported name. Sphinx may resolve the private path by
  itself (a suffix match), so this runs before resolution."""
  del app
  from sphinx import addnodes  # pylint: disable=g-import-not-at-top
  for node in doctree.findall(addnodes.pending_xref):
    if node.get("refdomain") != "py":
      continue
    old = node.get("reftarget", "")
    new = _exported(old)
    if new is None:
      continue
    node["reftarget"] = new
    for text in list(node.findall(nodes.Text)):
      if old in text:
        text.parent.replace(text, nodes.Text(str(text).replace(old, new)))


def setup(app):
  app.connect("doctree-read", _publish_private_paths)
  # Before intersphinx's own handler (priority 500), which would find nothing
  # under the private path.
  app.connect("missing-reference", _missing_reference, priority=400)
  app.connect("autodoc-process-signature", _process_signature)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
