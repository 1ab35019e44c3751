"""sharpjax.measures: how sharp is a solution?

Pure functions over a per-example ``loss_fn(params, batch) -> [B]``, parameters
as any pytree, and data as one batch or an iterable of batches (averaged with
batch-size weights); random measures take a PRNG key and are deterministic for
a fixed key. Measure Flax models with BatchNorm in eval mode.

    import sharpjax.measures as sm

    top = sm.hessian_eigenpairs(loss_fn, params, batches, key, k=3)
    tr = sm.hessian_trace(loss_fn, params, batches, key, num_probes=100)
    dens = sm.spectral_density(loss_fn, params, batches, key, num_steps=90)
    sharp = sm.worst_case_sharpness(loss_fn, params, batches, rho=2e-3,
                                    norm="linf", adaptive=True, m=128)
    fig = sm.plot_spectral_density(dens)
"""

# Data.
from sharpjax.measures._data import as_batches
from sharpjax.measures._data import Batches

# The Hessian: products, eigenpairs, trace, spectral density, Renyi sharpness.
# (Hutchinson's estimator lives with the Hessian-vector product in
# sharpjax._src.hessian, which the Renyi regularizer shares.)
from sharpjax._src.hessian import hutchinson
from sharpjax.measures._hessian import density_from_quadrature
from sharpjax.measures._hessian import Eigenpairs
from sharpjax.measures._hessian import hessian_eigenpairs
from sharpjax.measures._hessian import hessian_trace
from sharpjax.measures._hessian import hvp
from sharpjax.measures._hessian import lanczos
from sharpjax.measures._hessian import power_iteration
from sharpjax.measures._hessian import renyi_sharpness
from sharpjax.measures._hessian import spectral_density
from sharpjax.measures._hessian import spectral_moment
from sharpjax.measures._hessian import SpectralDensity
from sharpjax.measures._hessian import TraceEstimate
from sharpjax.measures._hessian import tridiagonal_eigh

# Worst-case and average-case (adaptive) m-sharpness.
from sharpjax.measures._sharpness import apgd_checkpoints
from sharpjax.measures._sharpness import average_case_sharpness
from sharpjax.measures._sharpness import classification_error
from sharpjax.measures._sharpness import classification_loss
from sharpjax.measures._sharpness import normalize_logits
from sharpjax.measures._sharpness import project_ellipsoid
from sharpjax.measures._sharpness import SharpnessResult
from sharpjax.measures._sharpness import worst_case_sharpness

# Geodesic sharpness (attention GL(h) symmetries removed).
from sharpjax.measures._geodesic import attention_blocks
from sharpjax.measures._geodesic import geodesic_sharpness
from sharpjax.measures._geodesic import SymmetricBlock

# Loss-landscape slices.
from sharpjax.measures._landscape import filter_normalized_direction
from sharpjax.measures._landscape import interpolate
from sharpjax.measures._landscape import landscape_1d
from sharpjax.measures._landscape import landscape_2d
from sharpjax.measures._landscape import normalize_direction
from sharpjax.measures._landscape import Slice1D
from sharpjax.measures._landscape import Slice2D

# Figures (matplotlib is imported when a function is called).
from sharpjax.measures._plot import plot_slice_1d
from sharpjax.measures._plot import plot_slice_2d
from sharpjax.measures._plot import plot_spectral_density
