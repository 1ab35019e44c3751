r"""AUSAM: SAM on a sampled fraction of the batch, favouring sharp examples.

Both SAM passes run on a static-size sample :math:`T` of the batch. Examples
are drawn without replacement with probabilities from a per-example score (the
running mean of :math:`|\ell_i(w+\epsilon) - \ell_i(w)|`, a cheap proxy of the
per-example gradient norm) that the optimizer state keeps by sample id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sharpjax._src import ascent
from sharpjax._src import base
from sharpjax._src import example_ids
from sharpjax._src import perturbed as perturbed_lib
from sharpjax._src import protocol
from sharpjax._src import sharpness_aware as wrapper


class AUSAMState(NamedTuple):
  """State of :func:`ausam`.

  Attributes:
    count: number of updates taken (int32).
    key: raw ``uint32`` key data for the sampler; advances every step.
    scores: float32 ``[num_examples]``, running mean of each example's loss
      change under the perturbation (0 until first sampled).
    visits: int32 ``[num_examples]``, how many times each example was sampled.
    dropped_ids: int32, how many ids outside ``[0, num_examples)`` were seen
      so far (they are trained on but never read or write a table row).
    diagnostics: what the last step saw; read it with
      :func:`sharpjax.diagnostics`.
    passes: None between steps; after ``update(..., report_passes=True)``
      the :class:`sharpjax.StepPasses` of the clean pass on the sample
      (taken out by :func:`sharpjax.pop_step_passes`).

  Class attributes (not fields), read by trainers instead of testing the type:

  - ``EXAMPLE_AXES``: the per-example tables, field name -> the axis indexed
    by example id (``scores`` and ``visits``, axis 0). A trainer may shard
    these fields by example along that axis.
  - ``PASSES = "own"``: AUSAM runs its own passes on its sample; the loop
    runs none, and the sample's clean pass gives the step's losses, logits
    and model state.
  """

  count: jax.Array
  key: jax.Array
  scores: jax.Array
  visits: jax.Array
  dropped_ids: jax.Array
  diagnostics: perturbed_lib.Diagnostics
  passes: Optional[protocol.StepPasses] = None

  EXAMPLE_AXES = {"scores": 0, "visits": 0}
  PASSES = protocol.OWN


def upper_frequency(count, f_min, f_max, transition_steps) -> jax.Array:
  r"""The schedule :math:`f_{\max}(t)`: from ``f_min`` at step 0 to ``f_max``.

  Linear over ``transition_steps`` steps, then held; ``transition_steps=0``
  gives ``f_max`` from the start.
  """
  t = jnp.asarray(count, jnp.float32)
  steps = jnp.asarray(transition_steps, jnp.float32)
  frac = jnp.where(steps > 0, jnp.clip(t / jnp.maximum(steps, 1.0), 0.0, 1.0),
                   1.0)
  f_min = jnp.asarray(f_min, jnp.float32)
  return f_min + frac * (jnp.asarray(f_max, jnp.float32) - f_min)


def sampling_probabilities(scores, visited, f_min, f_high) -> jax.Array:
  r"""AUSAM's sampling probabilities over one batch.

  .. math::
    q_i = f_{\min} + \frac{s_i - \min_j s_j}{\max_j s_j - \min_j s_j}
    (f_{\max}(t) - f_{\min}), \qquad p_i = q_i / \textstyle\sum_j q_j,

  with min and max over the batch. An example never sampled yet counts as
  having the batch's largest score (so it is drawn early and gets one); when
  all scores are equal, :math:`q_i = f_{\min}` and sampling is uniform.

  Args:
    scores: float32 ``[B]``, the batch's rows of the score table.
    visited: bool ``[B]``, whether each example has a score yet.
    f_min: the lower frequency (> 0).
    f_high: :math:`f_{\max}(t)`.

  Returns:
    float32 ``[B]`` probabilities summing to 1.
  """
  scores = scores.astype(jnp.float32)
  any_visited = jnp.any(visited)
  high = jnp.max(jnp.where(visited, scores, -jnp.inf))
  high = jnp.where(any_visited, high, 0.0)
  scores = jnp.where(visited, scores, high)
  low = jnp.min(scores)
  spread = jnp.max(scores) - low
  unit = (scores - low) * base.safe_inverse(spread)
  q = f_min + unit * (f_high - f_min)
  return q / jnp.sum(q)


def sample_without_replacement(key, probabilities, k: int) -> jax.Array:
  """``k`` distinct indices drawn without replacement (Gumbel top-k).

  Equivalent to drawing one index at a time with probability proportional to
  ``probabilities`` among those not drawn yet (``torch.multinomial`` without
  replacement, as in the official code).
  """
  gumbel = jax.random.gumbel(key, probabilities.shape, jnp.float32)
  _, indices = jax.lax.top_k(jnp.log(probabilities) + gumbel, k)
  return indices


def _batch_ids(batch) -> jax.Array:
  if not isinstance(batch, Mapping) or "ids" not in batch:
    raise ValueError(
        "sharpjax.ausam: the batch must be a dict-like pytree with an 'ids' "
        "entry holding each example's dataset index in [0, num_examples) "
        "(AUSAM keeps a score per example). Got a batch with "
        f"{list(batch) if isinstance(batch, Mapping) else type(batch).__name__}."
    )
  ids = example_ids.as_ids(batch["ids"])  # not narrowed before the check
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
        "sharpjax.ausam: batch['ids'] must be a 1-D integer array, got "
        f"{ids.dtype}{list(ids.shape)}."
    )
  return ids


def ausam(
    rho: base.ScalarOrSchedule = 0.05,
    keep: float = 0.5,
    f_min: float = 0.1,
    f_max: float = 0.5,
    transition_steps: int = 0,
    num_examples: int | None = None,
    *,
    seed: int = 0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Asymptotic Unbiased Sampling SAM (AUSAM).

  At step :math:`t`, with batch :math:`B` of :math:`b` examples carrying their
  dataset indices in ``batch["ids"]``:

  .. math::
    p = \mathrm{probabilities}(s_{\mathrm{ids}}, f_{\min}, f_{\max}(t)),
    \qquad T \sim p \text{ without replacement}, \; |T| = \lceil \alpha b
    \rceil,

  .. math::
    g_T = \nabla L_T(w), \quad \epsilon = \rho\frac{g_T}{\|g_T\|_2}, \quad
    \tilde g = \nabla L_T(w)\big|_{w+\epsilon}, \quad
    s_i \leftarrow \frac{s_i c_i + |\ell_i(w+\epsilon) - \ell_i(w)|}{c_i + 1},
    \; c_i \leftarrow c_i + 1 \;\; (i \in T),

  with the probabilities of :func:`sampling_probabilities` and
  :math:`f_{\max}(t)` rising linearly from ``f_min`` to ``f_max`` over
  ``transition_steps`` (:func:`upper_frequency`), so sampling starts uniform
  and grows more score-biased (up to a ratio ``f_max / f_min``).

  Cost: both passes run on the static-size sample :math:`T` (a gather of
  :math:`\lceil\alpha b\rceil` examples), so a step costs about
  :math:`2\alpha` forward-backward passes: SGD's FLOPs at :math:`\alpha =
  0.5`. AUSAM computes its clean gradient on :math:`T`, as the paper does,
  and does not use the full-batch gradient passed to ``update``. Its state
  declares ``PASSES = "own"``: :func:`sharpjax.training.make_trainer` runs
  no clean pass, and the step's loss, accuracy and BatchNorm statistics are
  those of the clean pass on :math:`T` (recorded with
  ``update(..., report_passes=True)``, see :func:`sharpjax.pop_step_passes`).
  A caller that computes the full-batch gradient anyway pays for it. The
  score table is updated in place (the written rows depend on the rows
  read), so a donated state is not copied.

  Differences from the official code (ajiaaa/AUSAM): there is no full-batch
  first epoch to initialise the scores; an example never sampled instead
  counts as having its batch's largest score, so it is drawn early.
  Sampling uses the Gumbel top-k trick. ``transition_steps`` counts steps,
  where the paper counts epochs (30). The sample holds
  :math:`\lceil\alpha b\rceil` examples, the official code
  ``int(alpha * b)`` (rounded down): the same whenever :math:`\alpha b` is a
  whole number (the paper's 0.5 of 256), one more example otherwise (a batch
  of 5 at ``keep=0.5`` trains on 3, the official code on 2), and never an
  empty sample (the official code draws none when :math:`\alpha b < 1`). To
  draw the official count on a batch of :math:`b`, pass
  ``keep=int(alpha * b) / b``.

  Sample ids: an id outside ``[0, num_examples)`` (negative ones included,
  and ids beyond int32, checked in their own dtype before any narrowing)
  never reads or writes a row of the table; the example is still trained on,
  sampled as if never seen, and counted in the state's ``dropped_ids`` (a
  running total).

  Args:
    rho: radius (>= 0), a number or an optax schedule (the paper's CIFAR runs
      use 0.1).
    keep: the sampled fraction :math:`\alpha` of each batch, in (0, 1]; 0.5
      in the paper. It sets a static shape: with ``optax.inject_hyperparams``
      list it in ``static_args``. 1 runs SAM on the whole batch (its own
      clean pass included) and still keeps the scores.
    f_min: lower frequency (> 0); 0.1 in the paper.
    f_max: upper frequency (>= f_min); 0.5 in the paper.
    transition_steps: steps over which :math:`f_{\max}(t)` rises (>= 0);
      the paper uses 30 epochs, that is ``30 * steps_per_epoch``.
    num_examples: size of the data set (required): the score table has one
      row per sample id.
    seed: seed of the sampler's key kept in the state.
    axis_name: inside ``jax.pmap`` / ``shard_map``, the gradient and the
      diagnostics are averaged over this axis, as for :func:`sharpjax.sam`;
      each device samples from its own batch, and every device writes the
      score rows of all devices (``all_gather``), so the tables stay equal
      (an id sampled on two devices in one step keeps one device's row).

  Returns:
    An ``optax.GradientTransformationExtraArgs``, called as
    :func:`sharpjax.sam` with a batch that carries ``ids``. The diagnostics'
    clean and perturbed losses are means over the sample :math:`T`, and
    ``grad_norm``/``cosine`` use its clean gradient.

  Example:
    >>> import optax, sharpjax as sj
    >>> tx = optax.chain(
    ...     sj.ausam(rho=0.1, keep=0.5, transition_steps=30 * 195,
    ...              num_examples=50_000),
    ...     optax.sgd(0.1, momentum=0.9))

  References:
    Deng et al., Asymptotic Unbiased Sample Sampling to Speed Up
    Sharpness-Aware Minimization, AAAI 2025. https://arxiv.org/abs/2406.08001
  """
  base.check_range("rho", rho, low=0.0)
  base.check_range("keep", keep, low=0.0, low_inclusive=False, high=1.0)
  base.check_range("f_min", f_min, low=0.0, low_inclusive=False)
  base.check_range("f_max", f_max, low=0.0, low_inclusive=False)
  if not (base.is_traced(f_min) or base.is_traced(f_max)):
    if float(f_max) < float(f_min):
      raise ValueError(
          f"f_max must be >= f_min, got f_min={float(f_min)!r}, "
          f"f_max={float(f_max)!r}."
      )
  base.check_int_like("transition_steps", transition_steps, low=0)
  if num_examples is None:
    raise ValueError(
        "num_examples is required: AUSAM keeps one score per example of the "
        "data set (ids in [0, num_examples))."
    )
  base.check_int_like("num_examples", num_examples, low=1)
  base.check_int_like("seed", seed, low=0)

  def init_memory(params):
    del params
    n = int(base.static_number("num_examples", num_examples, "ausam"))
    return dict(
        key=base.init_key_data(seed),
        scores=jnp.zeros((n,), jnp.float32),
        visits=jnp.zeros((n,), jnp.int32),
        dropped_ids=jnp.zeros([], jnp.int32),
    )

  def step(inputs):
    # The incoming full-batch gradient is not used: AUSAM's clean gradient is
    # that of the sample (see the docstring).
    params, loss_fn, batch = inputs.params, inputs.loss_fn, inputs.batch
    has_aux = inputs.has_aux
    # The state as a NamedTuple (the wrapper keeps count and diagnostics).
    state = AUSAMState(count=inputs.count, diagnostics=None, **inputs.memory)
    fraction = base.static_number("keep", keep, "ausam")
    ids = _batch_ids(batch)
    size = perturbed_lib.batch_size(batch)
    k = base.fraction_size(fraction, size)
    new_key, key = base.next_key(state.key)

    # Rows of the table; an out-of-range id is mapped one past the end, which
    # the gather fills and the scatter drops.
    safe_ids, valid = example_ids.table_rows(ids, state.scores.shape[0])
    scores = state.scores.at[safe_ids].get(mode="fill", fill_value=0.0)
    visits = state.visits.at[safe_ids].get(mode="fill", fill_value=0)

    f_high = upper_frequency(state.count, f_min, f_max, transition_steps)
    p = sampling_probabilities(
        scores, visits > 0, jnp.asarray(f_min, jnp.float32), f_high
    )
    if k == size:
      sample = jnp.arange(size)
      sub_batch = batch
    else:
      sample = sample_without_replacement(key, p, k)
      sub_batch = perturbed_lib.take_examples(batch, sample)

    clean = perturbed_lib.gradient_pass(
        loss_fn, params, sub_batch, has_aux=has_aux, name="ausam"
    )
    eps, grad_norm = ascent.sam_perturbation(
        clean.grads, base.resolve_radius(rho, state.count)
    )
    result = perturbed_lib.perturbed_pass(
        loss_fn, params, eps, sub_batch, has_aux=has_aux, name="ausam"
    )

    # Running mean of |loss change| for the sampled ids. The written rows are
    # computed from the rows read, which lets XLA update the table in place.
    change = jnp.abs(
        result.losses.astype(jnp.float32) - clean.losses.astype(jnp.float32)
    )
    old_scores, old_visits = scores[sample], visits[sample]
    new_visits = old_visits + 1
    new_scores = (old_scores * old_visits + change) / new_visits
    target = safe_ids[sample]
    if axis_name is not None:
      # Every device writes every device's rows, so the tables stay equal.
      target, new_scores, new_visits = perturbed_lib.gather_examples(
          (target, new_scores, new_visits), axis_name
      )
    # The state this step leads to; the wrapper advances count and stores the
    # diagnostics, the other fields are the step's memory.
    new_state = AUSAMState(
        count=inputs.count,
        key=new_key,
        scores=state.scores.at[target].set(new_scores, mode="drop"),
        visits=state.visits.at[target].set(new_visits, mode="drop"),
        dropped_ids=state.dropped_ids + jnp.sum(~valid, dtype=jnp.int32),
        diagnostics=perturbed_lib.diagnostics_of(
            clean.grads, eps, result.grads, result.loss, params=params,
            grad_norm=grad_norm, clean_loss=clean.loss,
        ),
    )
    if axis_name is not None:
      # Every device counts the dropped ids of all devices.
      new_state = new_state._replace(dropped_ids=state.dropped_ids + (
          jax.lax.psum(new_state.dropped_ids - state.dropped_ids, axis_name)))
    record = protocol.StepPasses(
        clean.losses.astype(jnp.float32),
        jax.tree.map(lambda a: a[None], clean.aux),
        None if k == size else sample.astype(jnp.int32))
    return wrapper.Step(result.grads, new_state.diagnostics,
                        wrapper.memory_of(new_state), passes=record)

  return wrapper.sharpness_aware(
      step,
      name="ausam",
      axis_name=axis_name,
      init_memory=init_memory,
      state_type=AUSAMState,
  )
