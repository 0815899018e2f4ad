"""ToyMLP's optional extra scalar input (the guidance weight of a distilled student)."""

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.models import registry
from guidelab.models.mlp import ToyMLP


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, generator=g), torch.rand(6, generator=g) + 0.1


@pytest.mark.parametrize("output", ["energy", "denoiser"])
def test_extra_scalar_changes_the_output_and_accepts_numbers_or_tensors(output):
    torch.manual_seed(0)
    net = ToyMLP(hidden=16, depth=2, output=output, extra_scalar="w").eval()
    with torch.no_grad():
        net.gain.fill_(1.0)
    x, sigma = _inputs()
    D2 = net(x, sigma, w=2.0)
    assert torch.equal(D2, net(x, sigma, w=torch.full((6,), 2.0)))
    assert not torch.allclose(D2, net(x, sigma, w=3.0))
    w = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    per_sample = net(x, sigma, w=w)
    assert torch.allclose(per_sample[1], D2[1]) and torch.allclose(per_sample[4], D2[4])
    # score agrees with the denoiser through Tweedie for both outputs
    assert torch.allclose(net.score(x, sigma, w=w), (per_sample - x) / sigma[:, None] ** 2, atol=1e-4, rtol=1e-4)


def test_extra_scalar_errors_and_config():
    net = ToyMLP(hidden=8, depth=1, output="denoiser", extra_scalar="w")
    x, sigma = _inputs()
    with pytest.raises(GuidelabError, match="needs the scalar w"):
        net(x, sigma)
    with pytest.raises(GuidelabError, match="unknown conditioning"):
        net(x, sigma, w=1.0, beta=2.0)
    with pytest.raises(GuidelabError, match="unknown conditioning"):
        ToyMLP(hidden=8, depth=1)(x, sigma, w=1.0)
    with pytest.raises(GuidelabError, match="extra_scalar"):
        ToyMLP(extra_scalar="label")
    assert net.config()["extra_scalar"] == "w"
    assert "extra_scalar" not in ToyMLP().config()  # configs of older models are unchanged
    rebuilt = registry.build({"name": "ToyMLP", **net.config()})
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x, sigma, w=2.5), net(x, sigma, w=2.5))
