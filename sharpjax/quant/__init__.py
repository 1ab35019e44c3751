"""sharpjax.quant: quantization-aware sharpness-aware training.

LSQ fake quantization for Flax (learned step sizes, straight-through
rounding), quantized Dense/Conv layers and small models, and GAQAT's /
FQAT's scale-gradient filters that run after SAGM:

    import optax, sharpjax as sj
    from sharpjax import quant

    model = quant.QuantCNN1D(w_bits=4, a_bits=4)           # W4A4
    tx = optax.chain(quant.gaqat(rho=0.05, alpha=0.001), optax.adam(1e-3))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch)

Equivalently ``optax.chain(sj.sagm(), quant.gaqat_scale_filter(), base)``
with ``task_grads=grads`` passed to ``update``.
"""

# LSQ fake quantization.
from sharpjax.quant._lsq import calibrate
from sharpjax.quant._lsq import is_step
from sharpjax.quant._lsq import lsq_grad_scale
from sharpjax.quant._lsq import lsq_init_step
from sharpjax.quant._lsq import lsq_quantize
from sharpjax.quant._lsq import quant_range
from sharpjax.quant._lsq import QuantConv
from sharpjax.quant._lsq import QuantDense
from sharpjax.quant._lsq import round_ste
from sharpjax.quant._lsq import scale_gradient

# Quantized models (first layer's weights and the classifier in full precision).
from sharpjax.quant._models import QuantCNN1D
from sharpjax.quant._models import QuantMLP

# GAQAT and FQAT scale-gradient filters.
from sharpjax.quant._gaqat import chronological
from sharpjax.quant._gaqat import disorder
from sharpjax.quant._gaqat import filter_summary
from sharpjax.quant._gaqat import fqat_layer_filter
from sharpjax.quant._gaqat import freeze_mask
from sharpjax.quant._gaqat import gaqat
from sharpjax.quant._gaqat import gaqat_scale_filter
from sharpjax.quant._gaqat import GAQATState
from sharpjax.quant._gaqat import scale_gradient_filter
from sharpjax.quant._gaqat import ScaleFilterState
from sharpjax.quant._gaqat import step_leaf_names
