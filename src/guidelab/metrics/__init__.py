"""Metrics: quality, variation and distance between sample sets."""

from .pointcloud import knn_radii, mean_logp, mmd, precision_recall, sliced_wasserstein

__all__ = ["precision_recall", "knn_radii", "sliced_wasserstein", "mmd", "mean_logp"]
