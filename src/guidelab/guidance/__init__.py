"""Guiders: functions that build a denoiser out of denoisers.

One weight convention everywhere: ``D = D_ref + w (D - D_ref)``, ``w = 1`` is no guidance.
Guiders compose: wrappers (``interval``, ``epsilon_scaling``) take any guider; ``compose`` sums linear
guiders sharing a main branch (CFG + PAG, CFG + autoguidance); non-linear rules
(``rescale``, ``cfg_zero_star``, ``apg``) take a linear guider (``cfg``, ``autoguidance``, ``icg``, ``tsg``).
The contract (:mod:`.protocols`): every guider is a :class:`Guider` (``requires``, ``unguided``,
``start(run)``, ``pair``); a conditional denoiser declares a :class:`Condition`; samplers create one
:class:`Run` per run. See docs/GUIDANCE.md for the table of methods.
"""

from ._base import DROP, Branch, Guided, PerCall, evaluate
from .apg import APGMomentum, apg
from .autoguidance import autoguidance
from .cads import cads
from .cfg import cfg
from .cfg_norm import cfg_norm
from .cfg_zero_star import cfg_zero_star
from .cfgpp import CFGpp, cfgpp
from .classifier import ClassifierGuided, classifier
from .compose import Composed, compose
from .dynamic_thresholding import dynamic_thresholding
from .epsilon_scaling import epsilon_scaling
from .fdg import fdg
from .fkc import fkc_sample
from .icg import icg
from .interval import interval
from .mag import mag
from .perp_neg import perp_neg
from .protocols import Condition, Guider, OnePass, Run  # first: samplers import it
from .rescale import rescale
from .self_guide import self_guidance
from .superdiff import superdiff
from .tcfg import tcfg
from .tfg import tfg_sample
from .tsg import tsg
from .weak_copy import lowp_autoguidance, pruned_autoguidance
from .weight_schedule import WeightSchedule, parse_weight, weight_schedule

__all__ = [
    "autoguidance",
    "cfg",
    "rescale",
    "cfg_zero_star",
    "icg",
    "tsg",
    "cfgpp",
    "interval",
    "apg",
    "epsilon_scaling",
    "classifier",
    "tfg_sample",
    "fkc_sample",
    "superdiff",
    "ClassifierGuided",
    "compose",
    "Composed",
    "Guider",
    "Condition",
    "Run",
    "OnePass",
    "APGMomentum",
    "CFGpp",
    "Branch",
    "Guided",
    "PerCall",
    "evaluate",
    "DROP",
    "tcfg",
    "fdg",
    "cfg_norm",
    "mag",
    "dynamic_thresholding",
    "perp_neg",
    "cads",
    "weight_schedule",
    "WeightSchedule",
    "parse_weight",
    "self_guidance",
    "lowp_autoguidance",
    "pruned_autoguidance",
]
