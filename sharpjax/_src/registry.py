"""One card per training method: the single source the rest reads.

Each :class:`MethodCard` holds a method's name, constructor, the
hyper-parameters it exposes, its rule and cost in a line each, and its
papers. The defaults are never written here: they are read from the
constructor's signature. The command line's registry (``sharpjax.cli``), the
documentation's method table and the README's table are built from these
cards (a test checks the README's copy), and a test checks that each
constructor's docstring cites the card's papers, so nothing drifts.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

from sharpjax._src import ausam
from sharpjax._src import esam
from sharpjax._src import fsam
from sharpjax._src import gsam
from sharpjax._src import late_phase
from sharpjax._src import looksam
from sharpjax._src import mesa
from sharpjax._src import momentum_sam
from sharpjax._src import msam
from sharpjax._src import saf
from sharpjax._src import sagm
from sharpjax._src import sam
from sharpjax._src import sampa
from sharpjax._src import ssam


@dataclasses.dataclass(frozen=True)
class Paper:
  """A reference: ``citation`` ("Author et al., Title, venue year") and URL."""

  citation: str
  url: str

  def __str__(self) -> str:
    return f"{self.citation}. {self.url}"


@dataclasses.dataclass(frozen=True)
class MethodCard:
  """What there is to know about one method, in one place.

  Attributes:
    name: the method's name (the command line's ``--methods NAME``).
    constructor: the ``sharpjax`` function building its transformation (None
      for plain SGD, the baseline).
    hyper: the hyper-parameters tables and the command line expose, in order.
    summary: what it does, in a few words.
    rule: the perturbation or penalty in one line.
    cost: the cost of one step, in forward-backward passes.
    papers: the references, the method's own paper first.
    needs: what the run must tell the constructor (no default), shown
      before the hyper-parameters.
  """

  name: str
  constructor: Optional[Callable[..., Any]]
  hyper: tuple[str, ...]
  summary: str
  rule: str
  cost: str
  papers: tuple[Paper, ...] = ()
  needs: tuple[str, ...] = ()

  def defaults(self) -> dict[str, Any]:
    """The defaults of :attr:`hyper`, read from the constructor's signature.

    Example:
      >>> from sharpjax._src import registry
      >>> registry.card("looksam").defaults()
      {'rho': 0.05, 'k': 5, 'alpha': 0.7}
    """
    if self.constructor is None:
      return {}
    parameters = inspect.signature(self.constructor).parameters
    return {name: parameters[name].default for name in self.hyper}

  @property
  def call(self) -> str:
    """``sj.name(hyper, ...)``, as the tables show it."""
    if self.constructor is None:
      return self.name
    arguments = ", ".join(self.needs + self.hyper)
    return f"sj.{self.constructor.__name__}({arguments})"


def _paper(citation: str, url: str) -> Paper:
  return Paper(citation, url)


_FORET = _paper("Foret et al., Sharpness-Aware Minimization for Efficiently "
                "Improving Generalization, ICLR 2021",
                "https://arxiv.org/abs/2010.01412")
_SAF = _paper("Du et al., Sharpness-Aware Training for Free, NeurIPS 2022",
              "https://arxiv.org/abs/2205.14083")

CARDS: tuple[MethodCard, ...] = (
    MethodCard(
        "sgd", None, (), "plain SGD with momentum, the baseline",
        "no perturbation", "1 forward-backward"),
    MethodCard(
        "sam", sam.sam, ("rho",),
        "gradient at the worst point of an L2 ball",
        "ε = ρ g / ‖g‖", "2 forward-backward", (_FORET,)),
    MethodCard(
        "asam", sam.asam, ("rho", "eta"),
        "SAM in a weight-scaled ellipsoid",
        "ε = ρ T²g / ‖Tg‖, T = |w| + η on kernels and scales, 1 on biases",
        "2 forward-backward",
        (_paper("Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization "
                "for Scale-Invariant Learning of Deep Neural Networks, "
                "ICML 2021", "https://arxiv.org/abs/2102.11600"),)),
    MethodCard(
        "gsam", gsam.gsam, ("rho", "alpha"),
        "SAM plus an ascent on the surrogate gap",
        "SAM's ε; descends on g_p − α (g − ⟨g, ĝ_p⟩ ĝ_p); "
        "sj.gsam_rho_schedule ties ρ to the learning rate",
        "2 forward-backward",
        (_paper("Zhuang et al., Surrogate Gap Minimization Improves "
                "Sharpness-Aware Training, ICLR 2022",
                "https://arxiv.org/abs/2203.08065"),)),
    MethodCard(
        "looksam", looksam.looksam, ("rho", "k", "alpha"),
        "a full SAM step every k steps, its direction reused between",
        "SAM every k steps, caching g_v = g_s − ⟨g_s, ĝ⟩ ĝ; in between "
        "d = g + α ‖g‖/‖g_v‖ g_v with no second pass (two compiled steps "
        "chosen on the host with full_step=, else lax.cond)",
        "(k+1)/k forward-backward",
        (_paper("Liu et al., Towards Efficient and Scalable Sharpness-Aware "
                "Minimization, CVPR 2022",
                "https://arxiv.org/abs/2203.02714"),)),
    MethodCard(
        "fsam", fsam.fsam, ("rho", "sigma", "lam"),
        "SAM without the full-gradient component",
        "ε = ρ d / ‖d‖, d = g − σ m, m an EMA of the clean gradients",
        "2 forward-backward",
        (_paper("Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024",
                "https://arxiv.org/abs/2403.12350"),)),
    MethodCard(
        "msam", msam.msam, ("rho", "num_chunks"),
        "SAM on num_chunks micro-batches, averaged (m-sharpness)",
        "one SAM ε per chunk of B/num_chunks examples, the perturbed "
        "gradients averaged", "2 forward-backward (its own per-chunk clean "
        "gradients)",
        (_paper("Behdin et al., mSAM: Micro-Batch-Averaged Sharpness-Aware "
                "Minimization, 2022", "https://arxiv.org/abs/2212.04343"),
         _FORET,
         _paper("Andriushchenko and Flammarion, Towards Understanding "
                "Sharpness-Aware Minimization, ICML 2022",
                "https://arxiv.org/abs/2206.06232"))),
    MethodCard(
        "esam", esam.esam, ("rho", "beta", "gamma"),
        "random weight subset and the examples whose loss rose most",
        "ε = (ρ/β) m⊙g / ‖m⊙g‖, each tensor kept with probability β; descent "
        "on the ⌈γB⌉ examples whose loss rose most",
        "clean pass + 1 forward + γ forward-backward",
        (_paper("Du et al., Efficient Sharpness-aware Minimization for "
                "Improved Training of Neural Networks, ICLR 2022",
                "https://arxiv.org/abs/2110.03141"),)),
    MethodCard(
        "ssam", ssam.ssam,
        ("rho", "sparsity", "mask", "num_fisher_samples", "update_every"),
        "SAM on a sparse, Fisher-chosen weight mask",
        "ε = m ⊙ ρ g / ‖g‖ on a mask keeping ⌊(1−s)n⌋ weights, refreshed "
        "every update_every steps",
        "2 forward-backward (+ per-example gradients at each refresh)",
        (_paper("Mi et al., Make Sharpness-Aware Minimization Stronger: A "
                "Sparsified Perturbation Approach, NeurIPS 2022",
                "https://arxiv.org/abs/2210.05177"),)),
    MethodCard(
        "ausam", ausam.ausam,
        ("rho", "keep", "f_min", "f_max", "transition_steps"),
        "SAM on a score-sampled share of the batch",
        "SAM on ⌈keep·B⌉ examples drawn by per-example scores kept by "
        "batch['ids']", "2·keep forward-backward",
        (_paper("Deng et al., Asymptotic Unbiased Sample Sampling to Speed "
                "Up Sharpness-Aware Minimization, AAAI 2025",
                "https://arxiv.org/abs/2406.08001"),),
        needs=("num_examples",)),
    MethodCard(
        "sagm", sagm.sagm, ("rho", "alpha"),
        "SAM plus matching of the clean and perturbed gradients",
        "ε = (ρ/‖g‖ − α) g; descends on ½(g + g_p)", "2 forward-backward",
        (_paper("Wang et al., Sharpness-Aware Gradient Matching for Domain "
                "Generalization, CVPR 2023",
                "https://arxiv.org/abs/2303.10353"),)),
    MethodCard(
        "momentum_sam", momentum_sam.momentum_sam, ("rho",),
        "one pass, at a point along the normalised momentum",
        "gradient at w − ρ v / ‖v‖, v the momentum buffer of past gradients; "
        "no pass at w",
        "1 forward-backward",
        (_paper("Becker et al., Momentum-SAM: Sharpness Aware Minimization "
                "without Computational Overhead, 2024",
                "https://arxiv.org/abs/2401.12033"),)),
    MethodCard(
        "sampa", sampa.sampa, ("rho", "lam"),
        "SAM's two gradients made independent, to run on two device groups",
        "x̃ = x + ρ g_y / ‖g_y‖, y' = the base step from x with g_y; "
        "d = (1 − λ) ∇L(x̃) + λ ∇L(y'), then g_y = ∇L(y')",
        "2 forward-backward, in parallel",
        (_paper("Xie et al., SAMPa: Sharpness-aware Minimization "
                "Parallelized, NeurIPS 2024",
                "https://arxiv.org/abs/2410.10683"),),
        needs=("learning_rate",)),
    MethodCard(
        "late_sam", late_phase.late_sam, ("rho", "start"),
        "SGD for most of the run, SAM from the switch on",
        "the plain gradient before start (a fraction of the run), SAM's "
        "after; the phase chosen on the host",
        "1 + (1 − start) forward-backward on average",
        (_paper("Zhou et al., Sharpness-Aware Minimization Efficiently "
                "Selects Flatter Minima Late in Training, ICLR 2025",
                "https://arxiv.org/abs/2410.10373"), _FORET),
        needs=("total_steps",)),
    MethodCard(
        "saf", saf.saf,
        ("strength", "temperature", "delay_epochs", "start_epoch"),
        "KL to each example's own logits of delay_epochs ago",
        "λ τ² KL(softmax(z_past/τ) ‖ softmax(z/τ)), z_past from a logit bank "
        "keyed by example id", "1 forward-backward + a gather and a scatter",
        (_SAF,), needs=("num_examples", "num_classes", "steps_per_epoch")),
    MethodCard(
        "mesa", mesa.mesa,
        ("strength", "temperature", "decay", "start_epoch"),
        "KL to an EMA teacher's outputs",
        "λ τ² KL(softmax(z_teacher/τ) ‖ softmax(z/τ)), the teacher an EMA of "
        "the weights", "1 forward-backward + 1 teacher forward", (_SAF,),
        needs=("steps_per_epoch",)),
)

_BY_NAME = {c.name: c for c in CARDS}


def card(name: str) -> MethodCard:
  """The card of method ``name``; a ``KeyError`` lists the valid names."""
  if name not in _BY_NAME:
    raise KeyError(f"unknown method {name!r}; known: {', '.join(_BY_NAME)}")
  return _BY_NAME[name]


def names() -> list[str]:
  """Every method's name, SGD first."""
  return list(_BY_NAME)


def markdown_table(cards=None) -> str:
  """The methods as a markdown table (the README's and the docs' table).

  Example:
    >>> from sharpjax._src import registry
    >>> print(registry.markdown_table([registry.card("sam")]))
    | transformation | rule | defaults | cost per step |
    |---|---|---|---|
    | `sj.sam(rho)` | ε = ρ g / ‖g‖ | rho=0.05 | 2 forward-backward |
  """
  cards = [c for c in (CARDS if cards is None else cards)
           if c.constructor is not None]
  lines = ["| transformation | rule | defaults | cost per step |",
           "|---|---|---|---|"]
  for c in cards:
    defaults = ", ".join(f"{k}={v!r}" for k, v in c.defaults().items())
    rule = c.rule.replace("|", "\\|")
    lines.append(f"| `{c.call}` | {rule} | {defaults} | {c.cost} |")
  return "\n".join(lines)
