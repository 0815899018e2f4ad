"""Metrics: quality, variation and distance between sample sets."""

from .classes import class_accuracy, inception_score
from .frechet import FeatureStats, fid_from_stats, frechet_distance
from .kid import kid
from .pointcloud import knn_radii, mean_logp, mmd, precision_recall, sliced_wasserstein
from .prdc import density_coverage

# isort: off
from .knn import knn_radii_multi, prdc  # after .prdc: the name prdc is the function, not the module
# isort: on

__all__ = [
    "precision_recall",
    "knn_radii",
    "sliced_wasserstein",
    "mmd",
    "mean_logp",
    "frechet_distance",
    "FeatureStats",
    "fid_from_stats",
    "kid",
    "density_coverage",
    "inception_score",
    "class_accuracy",
    "prdc",
    "knn_radii_multi",
]
