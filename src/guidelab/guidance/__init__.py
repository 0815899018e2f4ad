"""Guiders: functions that build a denoiser out of denoisers.

One weight convention everywhere: ``D = D_ref + w (D - D_ref)``, ``w = 1`` is no guidance.
"""

from ._base import DROP, Branch, Guided, evaluate
from .autoguidance import autoguidance
from .cfg import cfg

__all__ = ["autoguidance", "cfg", "Branch", "Guided", "evaluate", "DROP"]
