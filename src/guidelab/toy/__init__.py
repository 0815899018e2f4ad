"""Exact worlds: distributions whose density, score and denoiser are known in closed form."""

from .conditional import ConditionalTree, conditional_tree
from .mixture import GaussianMixture
from .posterior import LinearPosterior, digits_gmm, linear_posterior
from .tree import SIGMA_DATA, tree

__all__ = [
    "GaussianMixture",
    "tree",
    "SIGMA_DATA",
    "ConditionalTree",
    "conditional_tree",
    "linear_posterior",
    "LinearPosterior",
    "digits_gmm",
]
