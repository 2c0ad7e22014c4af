"""Steepest-descent optimizers: a functional core with thin ``torch.optim.Optimizer`` classes.

Steepest descent under a norm moves along the norm's dual map of the gradient:
the spectral norm gives Muon (``msign(G)``; NorMuon adds a per-row second moment), the ∞-norm SignSGD (``sign(G)``), and
log-space geometry on non-negative parameters exponentiated gradient descent. The
step-size optimizers adapt their rates with exponentiated-gradient updates (Su,
*Exponentiated gradient descent + meta-learning = adaptive learning rates*,
kexue.fm/archives/8968).

Every class derives from :class:`SteepestOptimizer` (argument checks, the
``nonfinite`` policy, checked ``load_state_dict``) and calls its functional core.
A :class:`MatrixView` says which matrices a parameter is for Muon and NorMuon (a
stack over leading dimensions, row blocks such as fused Q/K/V parts or heads);
:func:`qk_clip_` is Kimi K2's per-head QK-Clip, applied after a step.
"""

from ._base import NonFiniteGradientError, NonFiniteGradientWarning, SteepestOptimizer
from ._matrices import (
    DDP_STRATEGIES,
    MatrixView,
    Placement,
    matrix_shape,
    orthogonalize,
    orthogonalize_blocks,
    project_spectral_ball,
)
from .eg import (
    EGD,
    EGDD,
    EGDDState,
    EGStepSize,
    GRANULARITIES,
    HypergradientSGD,
    egd_step,
    egdd_step,
    eg_nu_update,
    eg_step_size_step,
    sgd_hd_step,
)
from .muon import (
    KELLER_JORDAN,
    Muon,
    adamw_step,
    muon_apply,
    muon_lr_scale,
    muon_momentum,
    muon_param_groups,
    muon_step,
)
from .normuon import NorMuon, normuon_normalize, normuon_step
from .qkclip import ClipAttention, max_attention_logits, qk_clip_
from .sign import SignSGD, sign_step

__all__ = [
    # optimizers
    "Muon",
    "NorMuon",
    "SignSGD",
    "EGD",
    "EGStepSize",
    "EGDD",
    "HypergradientSGD",
    "SteepestOptimizer",
    # functional cores
    "muon_step",
    "muon_momentum",
    "muon_apply",
    "muon_lr_scale",
    "adamw_step",
    "normuon_step",
    "normuon_normalize",
    "orthogonalize",
    "orthogonalize_blocks",
    "project_spectral_ball",
    "sign_step",
    "egd_step",
    "eg_nu_update",
    "eg_step_size_step",
    "egdd_step",
    "EGDDState",
    "sgd_hd_step",
    # parameter layout and placement
    "muon_param_groups",
    "matrix_shape",
    "MatrixView",
    "Placement",
    "DDP_STRATEGIES",
    "KELLER_JORDAN",
    "GRANULARITIES",
    # QK-Clip (MuonClip)
    "qk_clip_",
    "max_attention_logits",
    "ClipAttention",
    # non-finite gradients
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
]
