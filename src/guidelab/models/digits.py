"""Classifiers of the 8x8 digits (:func:`guidelab.data.digits`).

:class:`DigitsClassifier` -- a small conv net ``forward(x, sigma=None) -> logits`` [batch, 10];
``features(x)`` are its penultimate activations [batch, features], the feature space of the digits
Fréchet distance (:meth:`DigitsClassifier.extractor`). With ``noise_aware=True`` it is
``p_phi(y | x; sigma)`` for classifier guidance (Dhariwal & Nichol 2021): the input is EDM's
``c_in x`` and ``c_noise`` enters every layer through Fourier features; it is trained on
``x = x0 + sigma n``.

The trained-on-first-use cache of these classifiers (what the digits metrics use) is application layer:
:mod:`guidelab.app.digits_cache`.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..denoisers import EDMPrecond
from ..errors import GuidelabError, as_sigma, check
from .image import Fourier
from .registry import register

if TYPE_CHECKING:
    from ..metrics.features import Extractor


@register("DigitsClassifier")
class DigitsClassifier(nn.Module):
    """Conv(1->c) -> Conv(c->2c, /2) -> Conv(2c->2c, /2) -> Linear(features) -> Linear(num_classes), SiLU between."""

    def __init__(
        self,
        channels: int = 32,
        features: int = 128,
        num_classes: int = 10,
        img_resolution: int = 8,
        noise_aware: bool = False,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        for name, v in (
            ("channels", channels),
            ("features", features),
            ("num_classes", num_classes),
            ("img_resolution", img_resolution),
        ):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(img_resolution % 4 == 0, f"img_resolution must be divisible by 4, got {img_resolution}")
        self.channels, self.num_features, self.num_classes = channels, features, num_classes
        self.img_resolution, self.noise_aware, self.sigma_data = img_resolution, bool(noise_aware), float(sigma_data)
        c = channels
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, c, 3, padding=1),
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1),
            ]
        )
        self.fc = nn.Linear(2 * c * (img_resolution // 4) ** 2, features)
        self.head = nn.Linear(features, num_classes)
        if self.noise_aware:
            self.precond = EDMPrecond(self.sigma_data)
            self.fourier = Fourier(32, seed=3)
            self.noise_bias = nn.ModuleList(
                [nn.Linear(32, cast(nn.Conv2d, m).out_channels) for m in self.convs] + [nn.Linear(32, features)]
            )

    def config(self) -> dict:
        return dict(
            channels=self.channels,
            features=self.num_features,
            num_classes=self.num_classes,
            img_resolution=self.img_resolution,
            noise_aware=self.noise_aware,
            sigma_data=self.sigma_data,
        )

    def features(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate features [batch, features] (after the SiLU)."""
        r = self.img_resolution
        check(
            isinstance(x, torch.Tensor) and x.ndim == 4 and list(x.shape[1:]) == [1, r, r],
            f"x must be a tensor of shape [batch, 1, {r}, {r}], got {list(getattr(x, 'shape', []))}",
        )
        e = None
        if self.noise_aware:
            if sigma is None:
                raise GuidelabError("this classifier is noise-aware: call it as clf(x, sigma)")
            _, _, c_in, c_noise = self.precond.scalings(as_sigma(sigma, x))
            x = c_in[:, None, None, None] * x
            e = self.fourier(c_noise)
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if e is not None:
                h = h + self.noise_bias[i](e)[:, :, None, None]
            h = nn.functional.silu(h)
        h = self.fc(h.flatten(1))
        if e is not None:
            h = h + self.noise_bias[-1](e)
        return nn.functional.silu(h)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, num_classes]; ``sigma`` is needed (and only used) when noise-aware."""
        return self.head(self.features(x, sigma))

    def weights_sha256(self) -> str:
        """sha256 over the state dict (names and bytes, sorted), recorded with metrics."""
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def extractor(self) -> Extractor:
        """A :class:`guidelab.metrics.features.Extractor` of the penultimate features (clean classifier)."""
        from ..metrics.features import Extractor

        check(not self.noise_aware, "use a clean (noise_aware=False) digits classifier for metric features")
        return Extractor(
            "digits",
            lambda x: self.features(x.float()),
            self.num_features,
            {"extractor": "digits-classifier", "weights_sha256": self.weights_sha256(), "resize": None},
        )


def train_digits_classifier(
    model: DigitsClassifier | None = None,
    *,
    steps: int = 2000,
    batch: int = 128,
    lr: float = 2e-3,
    P_mean: float = -1.2,
    P_std: float = 1.5,
    seed: int = 0,
) -> DigitsClassifier:
    """Fit on the digits train split (cross-entropy, Adam, lr decayed as ``1/sqrt(step / 500)``).

    Noise-aware models see ``x0 + sigma n`` with ``ln sigma ~ N(P_mean, P_std^2)`` (the denoiser's
    training distribution). Deterministic given ``seed`` and the torch version, whatever the caller's
    thread count: it runs on one thread (fixed reduction order). Returns the model in eval mode.
    """
    from ..threads import threads

    with threads(1):
        return _train(model, steps=steps, batch=batch, lr=lr, P_mean=P_mean, P_std=P_std, seed=seed)


def _train(
    model: DigitsClassifier | None, *, steps: int, batch: int, lr: float, P_mean: float, P_std: float, seed: int
) -> DigitsClassifier:
    from ..data import digits

    data = digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model if model is not None else DigitsClassifier()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr / math.sqrt(max(step / 500, 1))
        i = torch.randint(len(data), (batch,), generator=g)
        assert data.labels is not None  # the digits set is labelled
        x, y = data.images[i], data.labels[i]
        sigma = None
        if model.noise_aware:
            sigma = (torch.randn(batch, generator=g) * P_std + P_mean).exp()
            x = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(model(x, sigma), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)
