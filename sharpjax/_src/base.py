"""Small pieces shared by every sharpjax transformation.

Validation of hyper-parameters, schedule evaluation and float32 tree reductions
live here so that each method module only holds the idea that makes it
different.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


# ---------------------------------------------------------------------------
# Hyper-parameter validation (construction time).
# ---------------------------------------------------------------------------


def _concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float, or None when it cannot be known now.

  Schedules and traced values (``optax.inject_hyperparams`` builds the
  transformation again inside ``update`` with traced hyper-parameters) are not
  checked: there is nothing concrete to check. Strings are refused although
  ``float`` would parse them: a number given as text is a mistake upstream.
  """
  if callable(value):
    return None
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (str, bytes)):
    raise TypeError(
        f"expected a number or an optax schedule, got the string {value!r}"
    )
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(
        f"expected a number or an optax schedule, got {type(value).__name__}"
    ) from None


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
  """Raises ``ValueError`` naming ``name`` if ``value`` is outside the range.

  NaN and infinities are outside every range; a string or another non-number
  raises ``TypeError`` naming ``name``.
  """
  try:
    v = _concrete_float(value)
  except TypeError as e:
    raise TypeError(f"{name}: {e}") from None
  if v is None:
    return
  ok = math.isfinite(v)
  if ok and low is not None:
    ok = v >= low if low_inclusive else v > low
  if ok and high is not None:
    ok = v <= high if high_inclusive else v < high
  if not ok:
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    lb = "[" if low_inclusive and low is not None else "("
    hb = "]" if high_inclusive and high is not None else ")"
    finite = "" if math.isfinite(v) else "a finite number "
    raise ValueError(f"{name} must be {finite}in {lb}{lo}, {hi}{hb}, got {v!r}.")


def check_int(name: str, value: Any, *, low: int) -> int:
  """Returns ``value`` as an int, raising ``ValueError`` if it is not >= low."""
  if isinstance(value, bool) or not isinstance(value, (int, jnp.integer)):
    if not (isinstance(value, float) and value.is_integer()):
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  value = int(value)
  if value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  return value


def resolve(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Evaluates a hyper-parameter that may be a schedule at step ``count``."""
  if callable(value):
    value = value(count)
  return jnp.asarray(value, jnp.float32)


def resolve_radius(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """A radius (or any hyper-parameter >= 0) at step ``count``, clipped at 0.

  A number is checked when the transformation is built; a schedule or an
  injected value is only known inside the step, where a negative value would
  silently flip the ascent into a descent. It is clipped to 0 there (no
  perturbation), which a step cannot refuse without waiting on the device.
  """
  return jnp.maximum(resolve(rho, count), 0.0)


# ---------------------------------------------------------------------------
# Float32 tree reductions.
# ---------------------------------------------------------------------------


def tree_vdot_f32(a: Any, b: Any) -> jax.Array:
  """Inner product of two pytrees, accumulated in float32."""
  # sum(x * y) rather than vdot: XLA:CPU lowers vdot to a chain of
  # reduce-windows, several kernels per leaf, which dominates small models.
  parts = jax.tree.map(
      lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b
  )
  return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def tree_inner_products(*pairs: tuple[Any, Any]) -> jax.Array:
  """Several float32 inner products of pytree pairs, in one pass per leaf.

  Returns a vector ``[<a_1, b_1>, ..., <a_k, b_k>]``. The ``k`` products of a
  leaf are summed by one variadic reduction, which XLA fuses with the
  multiplications: one kernel per leaf reads each input once, and no stacked
  copy of the products is written (separate reductions cost a kernel launch
  each on small models; a stack of the products costs a write and a read of
  ``k`` leaf-sized arrays).
  """
  leaves = [jax.tree.leaves(t) for pair in pairs for t in pair]
  k = len(pairs)
  total = [jnp.zeros((), jnp.float32)] * k
  for per_leaf in zip(*leaves):
    products = tuple(
        (per_leaf[2 * i].astype(jnp.float32)
         * per_leaf[2 * i + 1].astype(jnp.float32)).reshape(-1)
        for i in range(k)
    )
    sums = jax.lax.reduce(
        products, (jnp.float32(0),) * k,
        lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (0,),
    )
    total = [t + s for t, s in zip(total, sums)]
  return jnp.stack(total)


def tree_norm_f32(a: Any) -> jax.Array:
  """Global L2 norm of a pytree, accumulated in float32."""
  return jnp.sqrt(tree_vdot_f32(a, a))


def safe_inverse(norm: jax.Array) -> jax.Array:
  """1 / norm, and 0 where norm is 0 (a zero gradient gives a zero step)."""
  positive = norm > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, norm, 1.0), 0.0)


def tree_orthogonal(a: Any, b: Any) -> Any:
  r"""The component of ``a`` orthogonal to ``b``, in float32.

  :math:`a - \frac{\langle a, b\rangle}{\|b\|^2} b`, with the inner product
  and norm global over the pytree (a single array is a pytree, which gives
  the per-tensor form). When ``b`` is zero, ``a`` is returned unchanged.
  """
  b_norm = tree_norm_f32(b)
  inv = safe_inverse(b_norm)
  coef = tree_vdot_f32(a, b) * inv * inv
  return jax.tree.map(
      lambda x, y: x.astype(jnp.float32) - coef * y.astype(jnp.float32), a, b
  )


def tree_cast_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(jnp.asarray(y).dtype), tree, like)


def find_states(tree: Any, state_types: tuple[type, ...]) -> list[Any]:
  """Every node of ``tree`` (an optimizer state) that is one of ``state_types``.

  Walks nested ``optax.chain`` tuples, ``inject_hyperparams`` and
  ``MultiSteps`` states alike, since those are all pytrees.
  """
  is_match: Callable[[Any], bool] = lambda x: isinstance(x, state_types)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_match) if is_match(x)]


# ---------------------------------------------------------------------------
# Static hyper-parameters and keys (variants that sample or select).
# ---------------------------------------------------------------------------


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a tracer (for example under inject_hyperparams)."""
  return isinstance(value, jax.core.Tracer)


def static_number(name: str, value: Any, owner: str) -> float:
  """``value`` as a Python float, for a hyper-parameter that sets a shape.

  Such a hyper-parameter cannot be a traced array: ``optax.inject_hyperparams``
  makes every numeric argument a traced array inside ``update`` unless it is
  listed in ``static_args``, and this error says so.
  """
  if is_traced(value) or callable(value):
    raise ValueError(
        f"sharpjax.{owner}: {name} sets a static shape, so it must be a "
        "number known when the step is traced, not a schedule or a traced "
        f"array. With optax.inject_hyperparams, pass static_args=('{name}',)."
    )
  return float(value)


def check_int_like(name: str, value: Any, *, low: int) -> None:
  """Like :func:`check_int`, but lets a traced value through unchecked.

  Integer hyper-parameters that only enter arithmetic (a period, a number of
  steps) may arrive as arrays under ``optax.inject_hyperparams``.
  """
  if is_traced(value):
    return
  if isinstance(value, (jax.Array,)) and jnp.ndim(value) == 0:
    value = value.item()
  check_int(name, value, low=low)


def fraction_size(fraction: float, size: int) -> int:
  """``ceil(fraction * size)``, at least 1, forgiving float rounding.

  ``fraction_size(0.3, 10)`` is 3 although ``0.3 * 10`` is 3.0000000000000004.
  """
  return max(1, min(size, math.ceil(fraction * size - 1e-6)))


def init_key_data(seed: Any) -> jax.Array:
  """The raw ``uint32`` data of a PRNG key, for keeping a key in a state.

  Raw key data (rather than a typed key) keeps the state an ordinary pytree of
  numeric arrays that ``MultiSteps``, sharding and chex checks all handle.
  """
  if is_traced(seed):
    raise ValueError("seed must be a concrete integer, not a traced value.")
  return jax.random.key_data(jax.random.key(int(seed)))


def next_key(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits a key kept as raw data: ``(new key data, typed key to use now)``."""
  key, use = jax.random.split(jax.random.wrap_key_data(key_data))
  return jax.random.key_data(key), use
