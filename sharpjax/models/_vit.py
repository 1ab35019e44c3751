"""A small Vision Transformer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models import _common


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: attention then a GELU MLP, residuals."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.dropout_rate, deterministic=not train,
    )(y, y)
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(y)
    return x + y


class ViT(nn.Module):
  """Vision Transformer: patch embedding, class token, pre-LN encoder.

  Non-overlapping ``patch_size`` patches are embedded by a strided
  convolution, a learned class token and learned position embeddings are
  added, ``depth`` pre-LayerNorm blocks follow, and the class token's final
  LayerNorm'd features give the logits. Per block the parameter count is
  :math:`4(d^2 + d)` (attention) :math:`+ 2 d\\,m + m + d` (MLP)
  :math:`+ 4d` (two LayerNorms), for width d and MLP width m. The default
  (32x32 inputs, patch 4, d = 192, 6 blocks, 3 heads, m = 384) has
  1,806,538 parameters for 10 classes.

  Attributes:
    num_classes: number of output logits.
    patch_size: side of the square patches.
    hidden_size: embedding width d.
    depth: number of encoder blocks.
    num_heads: attention heads (must divide ``hidden_size``).
    mlp_dim: hidden width m of the MLPs.
    dropout_rate: dropout in attention and MLPs (needs a ``"dropout"`` rng).
    dtype: computation dtype.

  Example:
    A small ViT for CIFAR-100 (a 32x32 image is 64 patches of 4x4, plus the
    class token), its parameters counted from shapes alone:

    >>> import jax, jax.numpy as jnp
    >>> from sharpjax import models
    >>> vit = models.ViT(hidden_size=32, depth=2, num_heads=2, mlp_dim=64,
    ...                  num_classes=100)
    >>> shapes = jax.eval_shape(vit.init, jax.random.key(0),
    ...                         jnp.zeros((1, 32, 32, 3)))
    >>> shapes["params"]["pos_embedding"].shape
    (1, 65, 32)
    >>> models.param_count(shapes)
    24132

  References:
    Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image
    Recognition at Scale, ICLR 2021. https://arxiv.org/abs/2010.11929
  """

  num_classes: int = 10
  patch_size: int = 4
  hidden_size: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 384
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _common.check_rank("ViT", x, (4,), "[B, H, W, C]")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"sharpjax.models.ViT: num_heads ({self.num_heads}) must divide "
          f"hidden_size ({self.hidden_size})."
      )
    _, h, w, _ = x.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
          f"sharpjax.models.ViT: patch_size {self.patch_size} must divide the "
          f"image size {h}x{w}."
      )
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype)(x.astype(self.dtype))
    b = x.shape[0]
    x = jnp.reshape(x, (b, -1, self.hidden_size))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, x.shape[1], self.hidden_size))
    x = x + pos.astype(x.dtype)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for _ in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       dtype=self.dtype)(x, train)
    x = nn.LayerNorm(dtype=self.dtype)(x[:, 0])
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
