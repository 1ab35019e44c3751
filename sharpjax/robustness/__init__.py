"""sharpjax.robustness: accuracy when the weights themselves are perturbed.

- :func:`accuracy_under_perturbation` sweeps multiplicative or additive
  Gaussian weight noise, or k-bit quantisation, deterministically for a key;
  :func:`plot_perturbation_sweeps` draws the curves (matplotlib imported
  lazily);
- :func:`sat` is the SAT recipe (Xu et al., 2024): the SAM-family optax chain
  that trains weights which keep their accuracy under such perturbations.

    from sharpjax import robustness

    tx = robustness.sat()                       # ASAM(rho=0.5, eta=0) + Adam(0.01)
    sweep = robustness.accuracy_under_perturbation(
        lambda p: accuracy(p, x_test, y_test), params, jax.random.key(0),
        kind="multiplicative", strengths=[0.0, 0.1, 0.2, 0.4])
    fig = robustness.plot_perturbation_sweeps({"SAT": sweep})
"""

from sharpjax.robustness._perturb import accuracy_under_perturbation
from sharpjax.robustness._perturb import KINDS
from sharpjax.robustness._perturb import perturb_weights
from sharpjax.robustness._perturb import PerturbationSweep
from sharpjax.robustness._perturb import plot_perturbation_sweeps
from sharpjax.robustness._perturb import quantize
from sharpjax.robustness._sat import sat

__all__ = [
    "KINDS",
    "PerturbationSweep",
    "accuracy_under_perturbation",
    "perturb_weights",
    "plot_perturbation_sweeps",
    "quantize",
    "sat",
]
