"""One row of a digits results table: sample, measure against the digits test split, record everything.

:func:`evaluate` samples ``n`` images (seeds ``seed_start ..``, labels ``balanced``: seed % 10) with a
resumable :func:`guidelab.app.jobs.sample` job in ``OUT/samples``, then measures them in the feature space
of the clean digits classifier (:func:`guidelab.app.digits_cache.digits_classifier`: the one packaged with
guidelab, its sha256 pinned and checked at load, unless another checkpoint is given) against the 355
images of the digits test split:

* ``class_accuracy``: share of samples the classifier assigns to their label (None when the samples
  are unconditional);
* ``fd``: Fréchet distance of the 128-d penultimate features; ``precision`` / ``recall`` (k-NN, k = 3),
  ``density`` / ``coverage`` (k = 5), all four from :func:`guidelab.metrics.prdc` with the test split's
  k-NN radii computed once per :class:`DigitsMetrics`;
* ``nfe``: network evaluations per sample actually made (rows through the denoising networks divided
  by the sample count: batched CFG counts 2), ``classifier_evals`` for classifier guidance;
* ``sampling_seconds`` (summed over shards, so a resumed job reports the time of its shards) and
  ``metrics_seconds``.

``OUT/metrics.json`` also records the extractor and its weights hash, the seeds, the sampler and grid,
guider, weight, interval and the networks (paths, step, post-hoc EMA), and ``provenance``
(:mod:`guidelab.app.provenance`: version, commit, command line, files with sha256, torch, device);
``OUT/grid.png`` shows 10 rows (classes) x 10 samples and carries the provenance in PNG text chunks.
The floor for scale (train split vs test split) is recorded as ``fd_train_vs_test``. Both files are written atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from .._io import atomic_write, class_grid
from ..errors import check
from ..log import get_logger
from ..metrics import features
from . import jobs, provenance

log = get_logger(__name__)


class DigitsMetrics:
    """Digits metrics of images [N, 1, 8, 8] in [-1, 1] against the digits test split (see module doc)."""

    def __init__(self, classifier: str | os.PathLike | None = None):
        from ..data import digits
        from .digits_cache import digits_classifier

        self.clf = digits_classifier(classifier)
        self.extractor = self.clf.extractor()
        self.classifier_path = (
            str(classifier) if classifier is not None else "packaged (guidelab/assets, sha256 pinned: app.digits_cache.SHIPPED)"
        )
        test, train = digits("test"), digits("train")
        assert test.labels is not None  # the digits splits always carry labels
        self.ref = self.extractor(test.images)
        self.ref_radii = metrics.knn_radii_multi(self.ref, (3, 5))  # once per reference set
        self.ref_stats = metrics.FeatureStats(self.ref.shape[1]).update(self.ref)
        train_f = self.extractor(train.images)
        self.floor = {
            "fd_train_vs_test": metrics.fid_from_stats(self.ref_stats, metrics.FeatureStats(train_f.shape[1]).update(train_f)),
            "classifier_test_accuracy": metrics.class_accuracy(self.clf, test.images, test.labels),
            "reference": f"digits test split ({len(test.labels)} images)",
        }

    @torch.no_grad()
    def __call__(self, x, labels=None) -> dict:
        """``{fd, class_accuracy, precision, recall, density, coverage, class_histogram}`` of ``x``."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32).clamp(-1, 1)
        check(x.ndim == 4 and tuple(x.shape[1:]) == (1, 8, 8), f"digits metrics need images [N, 1, 8, 8], got {list(x.shape)}")
        f = self.extractor(x)
        q = metrics.prdc(self.ref, f, k_pr=3, k_dc=5, real_radii=self.ref_radii)
        pred = torch.cat([self.clf(b).argmax(1) for b in x.split(1024)])
        return {
            "fd": metrics.fid_from_stats(self.ref_stats, metrics.FeatureStats(f.shape[1]).update(f)),
            "class_accuracy": None if labels is None else float((pred == torch.as_tensor(labels)).double().mean()),
            "precision": q["precision"],
            "recall": q["recall"],
            "density": q["density"],
            "coverage": q["coverage"],
            "class_histogram": torch.bincount(pred, minlength=self.clf.num_classes).tolist(),
        }


def nfe_of(rows: dict, n: int) -> dict:
    """NFE per sample from network rows: ``nfe`` (denoising networks), ``classifier_evals``."""
    return {"nfe": (rows.get("model", 0) + rows.get("guide", 0)) / n, "classifier_evals": rows.get("classifier", 0) / n}


def evaluate(
    out: str | os.PathLike,
    cfg: jobs.SampleConfig,
    *,
    n: int = 1000,
    seed_start: int = 0,
    shard_size: int = 256,
    classifier: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = False,
    measure: DigitsMetrics | None = None,
) -> dict:
    """Sample ``n`` images of ``cfg`` into ``out/samples`` and write ``out/metrics.json`` and ``out/grid.png``.

    ``cfg.label`` None on a class-conditional model (or with classifier guidance) means ``"balanced"``. ``classifier``: the clean
    digits classifier's checkpoint (default: the packaged one). ``progress``: a bar over samples and phase
    lines (loading, metrics) on the ``guidelab`` logger. Returns the metrics dict.
    """
    out = Path(out)
    if progress:
        log.info("loading %s", cfg.model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # as guidelab sample
    job = jobs.build_balanced(cfg, device)  # validates and loads before anything is written
    cfg = job.cfg
    check(job.shape == (1, 8, 8), f"evaluate measures digits models (images [1, 8, 8]); {cfg.model} samples {list(job.shape)}")
    if measure is None and progress:
        log.info("loading the digits classifier and the test split's features")
    measure = measure or DigitsMetrics(classifier)
    jobs.sample(
        out / "samples", cfg, n=n, seed_start=seed_start, shard_size=shard_size, device=device, progress=progress, job=job
    )
    t = time.perf_counter()
    if progress:
        log.info("measuring %d samples (FD, precision / recall, density / coverage, class accuracy)", n)
    d = jobs.load_shards(out / "samples")
    target = d["labels"] if (not cfg.unconditional or cfg.guider == "classifier") else None
    row = measure(d["samples"], target)
    prov = provenance.of_job(
        job,
        seeds=d["seeds"],
        device=device,
        classifier=measure.classifier_path,
        classifier_weights_sha256=measure.clf.weights_sha256() if hasattr(measure.clf, "weights_sha256") else None,
    )
    grid_path = provenance.write_png(out / "grid.png", class_grid(d["samples"], target, d["seeds"]), prov)
    result = {
        **row,
        **nfe_of(d["rows"], len(d["seeds"])),
        "sampling_seconds": d["seconds"],
        "metrics_seconds": time.perf_counter() - t,
        **features.describe(measure.extractor, len(d["seeds"]), d["seeds"]),
        "classifier": measure.classifier_path,
        **measure.floor,
        **job.describe(),
        "config": json.loads(json.dumps(asdict(cfg))),
        "grid": grid_path.name,
        "provenance": prov,
    }
    atomic_write(out / "metrics.json", json.dumps(result, indent=1).encode())
    return result
