"""sharpjax.tta: test-time adaptation of a deployed model to shifted data.

Only the normalization layers' scales and biases move; each test batch is
predicted, then used to lower the prediction entropy:

- :func:`sar`: SAR (Niu et al., ICLR 2023): reliable-entropy filtering, a SAM
  step (``sj.sam``) on the filtered entropy, and a reset to the source model
  when the entropy's moving average collapses;
- :func:`tent`: Tent (Wang et al., ICLR 2021), plain entropy minimisation.

    from sharpjax import tta

    mask = tta.norm_param_mask(params, model=model, inputs=x_example)
    adapter = tta.sar(tta.flax_apply_fn(model, model_state),
                      learning_rate=2.5e-4, num_classes=10, mask=mask)
    state = adapter.init(params)
    for x in test_batches:
      state, info = adapter.step(state, x)     # info.logits: the predictions
"""

from sharpjax.tta._adapt import adapt_stream
from sharpjax.tta._adapt import AdaptInfo
from sharpjax.tta._adapt import filtered_mean
from sharpjax.tta._adapt import flax_apply_fn
from sharpjax.tta._adapt import sar
from sharpjax.tta._adapt import softmax_entropy
from sharpjax.tta._adapt import tent
from sharpjax.tta._adapt import TestTimeAdapter
from sharpjax.tta._adapt import TTAState
from sharpjax.tta._masks import mask_paths
from sharpjax.tta._masks import norm_param_mask
from sharpjax.tta._model import NormCNN1D

__all__ = [
    "AdaptInfo",
    "NormCNN1D",
    "TTAState",
    "TestTimeAdapter",
    "adapt_stream",
    "filtered_mean",
    "flax_apply_fn",
    "mask_paths",
    "norm_param_mask",
    "sar",
    "softmax_entropy",
    "tent",
]
