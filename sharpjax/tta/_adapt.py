r"""Online test-time adaptation: Tent and SAR.

A deployed classifier meets shifted test data. Each incoming batch is
predicted, then the normalization layers' scales and biases are moved to lower
the prediction entropy,

.. math::
  E(x) = -\sum_c p_c(x)\log p_c(x),\qquad p = \mathrm{softmax}(f_\Theta(x)),

so that the next batches are predicted by the adapted model. Tent takes a
plain gradient step on the mean entropy; SAR (sharpness-aware and reliable)
filters out high-entropy samples, takes a SAM step, and restores the source
model when an EMA of the entropy collapses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sharpjax._src import base
from sharpjax._src import diagnostics as diagnostics_lib
from sharpjax._src import sam as sam_lib
from sharpjax.tta import _masks

ApplyFn = Callable[[Any, jax.Array], jax.Array]
Mask = Union[Any, Callable[[Any], Any]]

ADAPT, FROZEN = "adapt", "frozen"


def softmax_entropy(logits: jax.Array) -> jax.Array:
  r"""Per-example entropy of the softmax, in float32 (nats), shape ``[B]``.

  :math:`E = -\sum_c p_c \log p_c` computed from ``log_softmax`` (no
  ``log 0``).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def filtered_mean(values: jax.Array, keep: jax.Array) -> jax.Array:
  r""":math:`\sum_i m_i v_i / \max(\sum_i m_i, 1)`: the mean over ``keep``.

  0 (with a zero gradient) when nothing is kept; the boolean mask carries no
  gradient.
  """
  keep = keep.astype(values.dtype)
  return jnp.sum(keep * values) / jnp.maximum(jnp.sum(keep), 1.0)


class TTAState(NamedTuple):
  """State of an online test-time adaptation run (a pytree).

  Attributes:
    step: test batches seen (int32).
    params: the current (adapted) parameters.
    opt_state: the optimizer state (adapted leaves only; the others frozen).
    ema: SAR's moving average of the second-pass entropy, float32; NaN when
      it is undefined (at the start and right after a reset). Tent: NaN.
    num_resets: how many times SAR restored the source model (int32).
    anchor_params: the source parameters a reset restores.
    anchor_opt_state: the optimizer state a reset restores.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema: jax.Array
  num_resets: jax.Array
  anchor_params: Any
  anchor_opt_state: Any


class AdaptInfo(NamedTuple):
  """What one adaptation step saw.

  Attributes:
    logits: ``[B, C]`` the predictions for this batch, from the first forward
      pass, *before* this batch's update (the online protocol of Tent/SAR).
    entropy: ``[B]`` the entropies of those predictions.
    num_reliable: SAR: samples with entropy below the margin (the set S1);
      Tent: the batch size.
    loss: the loss whose gradient was taken: SAR's filtered mean entropy over
      S1 (NaN when S1 is empty), Tent's mean entropy.
    perturbed_loss: SAR's second-pass loss, the mean entropy at the perturbed
      parameters over S2 = {i in S1 : E_i(Θ+ε) < margin} (NaN when S2 is
      empty); Tent: NaN.
    ema: SAR's EMA after this step, before a reset (NaN: undefined).
    reset: whether the model was restored after this step.
  """

  logits: jax.Array
  entropy: jax.Array
  num_reliable: jax.Array
  loss: jax.Array
  perturbed_loss: jax.Array
  ema: jax.Array
  reset: jax.Array


class TestTimeAdapter(NamedTuple):
  """What :func:`sar` and :func:`tent` return.

  Attributes:
    init: ``init(params) -> TTAState``; ``params`` are the source model's
      parameters (the full ``params`` collection).
    step: ``step(state, x) -> (state, AdaptInfo)``, jit-compiled: predicts the
      batch ``x`` and adapts on it.
    optimizer: ``params -> optax`` transformation used (frozen leaves get a
      zero update), for inspection.
  """

  init: Callable[[Any], TTAState]
  step: Callable[[TTAState, jax.Array], tuple[TTAState, AdaptInfo]]
  optimizer: Callable[[Any], optax.GradientTransformation]


def flax_apply_fn(
    model: nn.Module,
    model_state: Optional[dict] = None,
    *,
    train: bool = True,
    train_kwarg: Optional[str] = "train",
) -> ApplyFn:
  """``apply_fn(params, x) -> logits`` for a Flax linen model, for adaptation.

  With ``train=True`` (SAR's and Tent's setting) BatchNorm normalises with
  the test batch's own statistics; the running averages in ``model_state``
  are never updated (PyTorch's ``track_running_stats=False``). GroupNorm and
  LayerNorm models behave the same in both modes. The model must not use
  dropout in train mode (no rng is passed); write your own ``apply_fn`` if it
  does.

  Args:
    model: the linen module.
    model_state: the non-parameter collections (e.g. ``{"batch_stats": ...}``).
    train: the value given to ``train_kwarg``.
    train_kwarg: the keyword of the model's train switch (None if none).
  """
  model_state = dict(model_state or {})
  kwargs = {} if train_kwarg is None else {train_kwarg: train}

  def apply_fn(params, x):
    variables = {"params": params, **model_state}
    if train and model_state:
      logits, _ = model.apply(variables, x, mutable=list(model_state), **kwargs)
      return logits
    return model.apply(variables, x, **kwargs)

  return apply_fn


def _resolve_mask(mask: Mask, params: Any) -> Any:
  if mask is None:
    mask = _masks.norm_param_mask(params)
  elif callable(mask):
    mask = mask(params)
  leaves = jax.tree.leaves(mask)
  if not any(bool(v) for v in leaves):
    raise ValueError(
        "sharpjax.tta: the mask selects no parameter to adapt. By default the "
        "scale/bias of modules named like normalization layers are adapted; "
        "build the mask with norm_param_mask(params, model=..., inputs=...) "
        "or pass your own."
    )
  return mask


def _partitioned(inner: optax.GradientTransformation, mask: Any):
  labels = jax.tree.map(lambda m: ADAPT if m else FROZEN, mask)
  return optax.partition({ADAPT: inner, FROZEN: optax.set_to_zero()}, labels)


def _merge(mask: Any, full: Any, sub: Any) -> Any:
  """Puts the adapted leaves of ``sub`` (a masked tree) into ``full``."""
  return jax.tree.map(lambda m, f, s: s if m else f, mask, full, sub)


def _initial_state(params, tx) -> TTAState:
  params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(params)
  return TTAState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      opt_state=opt_state,
      ema=jnp.full([], jnp.nan, jnp.float32),
      num_resets=jnp.zeros([], jnp.int32),
      anchor_params=params,
      anchor_opt_state=opt_state,
  )


def _check_apply(apply_fn: Any) -> None:
  if not callable(apply_fn):
    raise TypeError(
        "sharpjax.tta: apply_fn must be callable as apply_fn(params, x) -> "
        f"logits, got {type(apply_fn).__name__}. For a Flax model use "
        "tta.flax_apply_fn(model, model_state)."
    )


def _logits_of(apply_fn, params, x, name):
  logits = apply_fn(params, x)
  if jnp.ndim(logits) != 2 or logits.shape[0] != x.shape[0]:
    raise ValueError(
        f"sharpjax.tta.{name}: apply_fn must return logits of shape [B, C] "
        f"with B = {x.shape[0]}, got {jnp.shape(logits)}."
    )
  return logits


def sar(
    apply_fn: ApplyFn,
    *,
    learning_rate: base.ScalarOrSchedule,
    num_classes: Optional[int] = None,
    margin: Optional[float] = None,
    rho: float = 0.05,
    momentum: float = 0.9,
    ema_decay: float = 0.9,
    reset_threshold: float = 0.2,
    mask: Mask = None,
) -> TestTimeAdapter:
  r"""SAR: sharpness-aware and reliable entropy minimisation at test time.

  For each test batch :math:`x` (model in train mode, BatchNorm on batch
  statistics), with :math:`E_0` the margin:

  .. math::
    S_1 &= \{i : E_i(\Theta) < E_0\}, \qquad
      g = \nabla_\Theta \tfrac{1}{|S_1|}\textstyle\sum_{i\in S_1} E_i(\Theta),
      \qquad \epsilon = \rho\, g/\|g\|, \\
    S_2 &= \{i\in S_1 : E_i(\Theta+\epsilon) < E_0\}, \qquad
      \Theta \leftarrow \mathrm{SGD}_{m}\Big(\Theta, \nabla_\Theta
      \tfrac{1}{|S_2|}\textstyle\sum_{i\in S_2} E_i\big|_{\Theta+\epsilon}\Big),\\
    e &\leftarrow \begin{cases} \ell_2 & e \text{ undefined}\\
      0.9\,e + 0.1\,\ell_2 & \text{otherwise}\end{cases}
      \quad(\text{skipped when } S_2=\emptyset),\qquad
    e < e_m \Rightarrow \Theta, \text{opt. state} \leftarrow \text{source};\;
      e \leftarrow \text{undefined}.

  Only the adapted leaves (normalization scale/bias by default) move: the
  optimizer is ``optax.partition`` with ``optax.chain(sj.sam(rho),
  optax.sgd(learning_rate, momentum))`` on them and a zero update elsewhere,
  so the SAM perturbation's norm is taken over the adapted leaves only. The
  predictions returned for a batch are those of the first forward pass.
  Empty sets are handled without NaN in the parameters: an empty :math:`S_1`
  gives a zero gradient (the momentum still carries), and the second-pass
  loss :math:`\ell_2` is NaN exactly when :math:`S_2` is empty (as the
  official code's mean of an empty tensor), which skips the EMA update.

  Cost: two forward-backward passes per test batch.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits [B, C]`` in adaptation mode
      (see :func:`flax_apply_fn`).
    learning_rate: SGD step size, a number or schedule. The paper: 0.00025
      for ResNet-50 at batch 64 (scaled by ``batch/32`` below 32), 0.001/64 x
      batch for ViT-B/16.
    num_classes: C, to set the default margin :math:`0.4\ln C`.
    margin: :math:`E_0` (> 0); default :math:`0.4\ln C`.
    rho: SAM radius (>= 0), 0.05 in the paper.
    momentum: SGD momentum in [0, 1), 0.9 in the paper.
    ema_decay: weight of the old EMA value in [0, 1), 0.9 in the paper.
    reset_threshold: :math:`e_m` (>= 0), 0.2 in the paper: the model is
      restored when the EMA falls below it.
    mask: which parameters to adapt: a pytree of bools shaped like the
      params, a function ``params -> mask``, or None for
      :func:`norm_param_mask` by name.

  Returns:
    A :class:`TestTimeAdapter`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax import tta
    >>> model = tta.NormCNN1D(norm="group")
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    >>> adapter = tta.sar(tta.flax_apply_fn(model), learning_rate=1e-3,
    ...                   num_classes=10)
    >>> state = adapter.init(params)
    >>> x = jax.random.normal(jax.random.key(1), (16, 40))
    >>> state, info = adapter.step(state, x)
    >>> info.logits.shape
    (16, 10)

  References:
    Niu et al., Towards Stable Test-Time Adaptation in Dynamic Wild World,
    ICLR 2023. https://arxiv.org/abs/2302.12400
  """
  _check_apply(apply_fn)
  if margin is None:
    if num_classes is None:
      raise ValueError("sar: pass num_classes= (margin 0.4 ln C) or margin=.")
    num_classes = base.check_int("num_classes", num_classes, low=2)
    margin = 0.4 * math.log(num_classes)
  base.check_range("margin", margin, low=0.0, low_inclusive=False)
  base.check_range("rho", rho, low=0.0)
  base.check_range("momentum", momentum, low=0.0, high=1.0,
                   high_inclusive=False)
  base.check_range("ema_decay", ema_decay, low=0.0, high=1.0,
                   high_inclusive=False)
  base.check_range("reset_threshold", reset_threshold, low=0.0)
  base.check_range("learning_rate", learning_rate, low=0.0)
  margin = float(margin)

  def optimizer(params):
    inner = optax.chain(
        sam_lib.sam(rho),
        optax.sgd(learning_rate, momentum=momentum or None),
    )
    return _partitioned(inner, _resolve_mask(mask, params))

  def init(params):
    return _initial_state(params, optimizer(params))

  @jax.jit
  def step(state: TTAState, x: jax.Array):
    params = state.params
    adapt_mask = _resolve_mask(mask, params)
    tx = optimizer(params)

    def first_pass(p):
      logits = _logits_of(apply_fn, p, x, "sar")
      ent = softmax_entropy(logits)
      keep = jax.lax.stop_gradient(ent) < margin
      return filtered_mean(ent, keep), (logits, ent, keep)

    (_, (logits, ent, keep1)), grads = jax.value_and_grad(
        first_pass, has_aux=True
    )(params)
    num_reliable = jnp.sum(keep1.astype(jnp.int32))

    def second_pass_losses(sub_params, batch):
      # Per-example terms whose mean is the filtered mean over S2; the
      # stop-gradient constant makes that mean NaN when S2 is empty (as the
      # official code's) without reaching the gradient.
      full = _merge(adapt_mask, params, sub_params)
      ent2 = softmax_entropy(_logits_of(apply_fn, full, batch["x"], "sar"))
      keep2 = batch["keep"] & (jax.lax.stop_gradient(ent2) < margin)
      count = jnp.sum(keep2.astype(jnp.float32))
      size = ent2.shape[0]
      terms = jnp.where(keep2, ent2, 0.0) * (size / jnp.maximum(count, 1.0))
      empty = jnp.where(count > 0, 0.0, jnp.nan)
      return terms + jax.lax.stop_gradient(empty)

    updates, opt_state = tx.update(
        grads,
        state.opt_state,
        params,
        loss_fn=second_pass_losses,
        batch={"x": x, "keep": keep1},
    )
    new_params = optax.apply_updates(params, updates)
    loss2 = diagnostics_lib.diagnostics(opt_state)["perturbed_loss"]

    has_loss2 = ~jnp.isnan(loss2)
    ema = jnp.where(
        jnp.isnan(state.ema),
        loss2,
        ema_decay * state.ema + (1.0 - ema_decay) * loss2,
    )
    ema = jnp.where(has_loss2, ema, state.ema).astype(jnp.float32)
    reset = ema < reset_threshold  # False while the EMA is undefined (NaN).

    def restore(_):
      return (state.anchor_params, state.anchor_opt_state,
              jnp.full([], jnp.nan, jnp.float32))

    def keep_going(_):
      return new_params, opt_state, ema

    out_params, out_opt_state, out_ema = jax.lax.cond(
        reset, restore, keep_going, None
    )
    new_state = state._replace(
        step=state.step + 1,
        params=out_params,
        opt_state=out_opt_state,
        ema=out_ema,
        num_resets=state.num_resets + reset.astype(jnp.int32),
    )
    loss1 = jnp.where(
        num_reliable > 0, filtered_mean(ent, keep1), jnp.nan
    ).astype(jnp.float32)
    info = AdaptInfo(
        logits=logits,
        entropy=ent,
        num_reliable=num_reliable,
        loss=loss1,
        perturbed_loss=loss2,
        ema=ema,
        reset=reset,
    )
    return new_state, info

  return TestTimeAdapter(init, step, optimizer)


def tent(
    apply_fn: ApplyFn,
    *,
    learning_rate: base.ScalarOrSchedule,
    momentum: float = 0.9,
    optimizer: Optional[optax.GradientTransformation] = None,
    mask: Mask = None,
) -> TestTimeAdapter:
  r"""Tent: test-time entropy minimisation on normalization parameters.

  .. math::
    \Theta \leftarrow \mathrm{opt}\Big(\Theta, \nabla_\Theta
    \tfrac{1}{B}\textstyle\sum_{i=1}^B E_i(\Theta)\Big),

  on every sample of every batch, with the same online protocol, parameter
  mask and adaptation-mode ``apply_fn`` as :func:`sar` (no filtering, no SAM
  step, no reset). The official Tent uses SGD with momentum 0.9 (ImageNet,
  lr 0.00025 at batch 64) or Adam (lr 1e-3, CIFAR).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits [B, C]``.
    learning_rate: SGD step size (ignored when ``optimizer`` is given).
    momentum: SGD momentum in [0, 1).
    optimizer: an optax transformation to use instead of SGD (applied to the
      adapted leaves only).
    mask: as in :func:`sar`.

  Returns:
    A :class:`TestTimeAdapter` (its ``AdaptInfo.perturbed_loss`` and ``ema``
    are NaN, ``reset`` is False).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sharpjax import tta
    >>> model = tta.NormCNN1D(norm="layer")
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    >>> adapter = tta.tent(tta.flax_apply_fn(model), learning_rate=1e-3)
    >>> state, info = adapter.step(adapter.init(params), jnp.ones((8, 40)))

  References:
    Wang et al., Tent: Fully Test-Time Adaptation by Entropy Minimization,
    ICLR 2021. https://arxiv.org/abs/2006.10726
  """
  _check_apply(apply_fn)
  base.check_range("learning_rate", learning_rate, low=0.0)
  base.check_range("momentum", momentum, low=0.0, high=1.0,
                   high_inclusive=False)
  inner = optimizer
  if inner is None:
    inner = optax.sgd(learning_rate, momentum=momentum or None)

  def make_optimizer(params):
    return _partitioned(inner, _resolve_mask(mask, params))

  def init(params):
    return _initial_state(params, make_optimizer(params))

  @jax.jit
  def step(state: TTAState, x: jax.Array):
    tx = make_optimizer(state.params)

    def loss_fn(p):
      logits = _logits_of(apply_fn, p, x, "tent")
      ent = softmax_entropy(logits)
      return jnp.mean(ent), (logits, ent)

    (loss, (logits, ent)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    nan = jnp.full([], jnp.nan, jnp.float32)
    new_state = state._replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    info = AdaptInfo(
        logits=logits,
        entropy=ent,
        num_reliable=jnp.asarray(x.shape[0], jnp.int32),
        loss=loss,
        perturbed_loss=nan,
        ema=nan,
        reset=jnp.zeros([], bool),
    )
    return new_state, info

  return TestTimeAdapter(init, step, make_optimizer)


def adapt_stream(
    adapter: TestTimeAdapter,
    params: Any,
    batches: Any,
) -> tuple[TTAState, list[AdaptInfo]]:
  """Runs ``adapter`` over an iterable of input batches (online).

  Returns the final state and the :class:`AdaptInfo` of every batch (its
  ``logits`` are the online predictions).
  """
  state = adapter.init(params)
  infos = []
  for x in batches:
    state, info = adapter.step(state, jnp.asarray(x))
    infos.append(info)
  return state, infos
