"""sharpjax: sharpness-aware training in JAX.

The SAM family as chainable optax transformations, SAF and MESA with their
logit bank / EMA teacher in the optimizer state, and the tools around them.
"""

__version__ = "0.1.0"

# The SAM family: perturb-then-descend transformations.
from sharpjax._src.sam import asam
from sharpjax._src.sam import sam
from sharpjax._src.sharpness_aware import sharpness_aware
from sharpjax._src.sharpness_aware import SharpnessAwareState

# The SAM family, direction-changing variants: GSAM, LookSAM, F-SAM, mSAM.
from sharpjax._src.fsam import fsam
from sharpjax._src.fsam import FSAMState
from sharpjax._src.gsam import gsam
from sharpjax._src.gsam import gsam_rho_schedule
from sharpjax._src.looksam import looksam
from sharpjax._src.looksam import LookSAMState
from sharpjax._src.msam import msam
from sharpjax._src.msam import MSAMState
from sharpjax._src.sagm import sagm

# The SAM family, cost-cutting variants: ESAM, SSAM, AUSAM.
from sharpjax._src.ausam import ausam
from sharpjax._src.ausam import AUSAMState
from sharpjax._src.esam import esam
from sharpjax._src.esam import ESAMState
from sharpjax._src.ssam import ssam
from sharpjax._src.ssam import SSAMState

# SAM's gains at about SGD's cost: Momentum-SAM (one pass at a point along
# the momentum), SAMPa (two independent gradients), late-phase SAM.
from sharpjax._src.late_phase import late_phase
from sharpjax._src.late_phase import late_sam
from sharpjax._src.late_phase import LatePhaseState
from sharpjax._src.momentum_sam import momentum_sam
from sharpjax._src.momentum_sam import MomentumSAMState
from sharpjax._src.sampa import sampa
from sharpjax._src.sampa import SAMPaState

# Trajectory regularizers: SAF (logit bank) and MESA (EMA teacher).
from sharpjax._src.mesa import init_teacher_model_state
from sharpjax._src.mesa import mesa
from sharpjax._src.mesa import mesa_auto_decay
from sharpjax._src.mesa import MESAState
from sharpjax._src.mesa import teacher
from sharpjax._src.saf import saf
from sharpjax._src.saf import saf_bank_bytes
from sharpjax._src.saf import SAFState
from sharpjax._src.trajectory import find_trajectory_state
from sharpjax._src.trajectory import trajectory_penalty
from sharpjax._src.trajectory_loss import TrajectoryDiagnostics

# A Renyi-sharpness regularizer (ours, from the RSAM paper's definition).
from sharpjax._src.renyi import renyi_regularizer
from sharpjax._src.renyi import renyi_sharpness_penalty
from sharpjax._src.renyi import RenyiRegularizerState

# Shared building blocks, for writing new variants.
from sharpjax._src.ascent import asam_perturbation
from sharpjax._src.ascent import default_adaptive_mask
from sharpjax._src.ascent import sam_perturbation
from sharpjax._src.perturbed import Diagnostics
from sharpjax._src.perturbed import perturbed_pass
from sharpjax._src.perturbed import PerturbedPass

# Where a step's gradients are taken, for a user's own loop.
from sharpjax._src.protocol import gradient_points
from sharpjax._src.protocol import passes
from sharpjax._src.protocol import pop_step_passes
from sharpjax._src.protocol import StepPasses

# Reading the state.
from sharpjax._src.diagnostics import diagnostics

# A loop of one's own: where the transformations may sit, data parallelism.
from sharpjax._src.chain import check_chain
from sharpjax._src.perturbed import gather_examples

# Subpackages load on first use (`sj.training`, `sj.measures`, ...), so that
# `import sharpjax` stays as light as optax.
_SUBPACKAGES = ("cli", "configs", "data", "launch", "measures", "models",
                "quant", "robustness", "training", "tta")


def __getattr__(name):
  if name in _SUBPACKAGES:
    import importlib
    return importlib.import_module(f"sharpjax.{name}")
  raise AttributeError(f"module 'sharpjax' has no attribute {name!r}")
