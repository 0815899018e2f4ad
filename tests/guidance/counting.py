"""A label-conditional test denoiser that records its calls (shared by the guidance tests)."""

import torch

from guidelab.guidance import Condition


class Counting(torch.nn.Module):
    """``D(x; sigma, label)`` recording (batch size, labels) per call; label 2 is the null label.
    The label shift is non-linear in the label so that any two labels give different outputs."""

    condition = Condition("label", {"label": 2}, 2)

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, label):
        self.calls.append((x.shape[0], label.clone()))
        shift = torch.stack([label.to(x.dtype), -(label.to(x.dtype) ** 2)], 1)
        return x / (1 + sigma[:, None] ** 2) + 0.1 * shift * sigma[:, None]


def inputs(B=8):
    """(x [B, 2], sigma [B], label [B] in {0, 1}) in float64, fixed seed."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, 2, generator=g, dtype=torch.float64),
        torch.rand(B, generator=g, dtype=torch.float64) + 0.1,
        torch.randint(0, 2, (B,), generator=g),
    )
