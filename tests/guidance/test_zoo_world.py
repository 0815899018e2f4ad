"""The zoo's intended effects on the exact world (EDM Heun, karras(32, 0.002, 5), fixed seeds).

World: the leaky conditional tree (label 0 = 0.7 A + 0.3 B, null = AB, all exact), so the
conditional branch is imperfect the way a network is and guidance has something to fix; for the
interval the perfect one (label 0 = A), where guidance can only trade variation away. Quality:
fraction of samples in class A (exact posterior) and k-NN precision against exact A samples;
variation: k-NN recall; overshoot: how far the samples' mean distance from the class mean exceeds
the data's.
"""

import functools

import pytest
import torch

from guidelab import guidance as G
from guidelab import metrics, samplers, schedules, toy

N = 256
SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float32)
W = toy.conditional_tree(leak=0.3)
W0 = toy.conditional_tree()
A, B = toy.tree("A"), toy.tree("B")
X0 = W.world(2).sample(N, 5.0, generator=torch.Generator().manual_seed(0))
REF = A.sample(N, 0.0, generator=torch.Generator().manual_seed(1))
COND = {"label": torch.zeros(N, dtype=torch.long)}

GUIDERS = {
    "unguided": lambda: W,
    "cfg4": lambda: G.cfg(W, 4.0),
    "icg4": lambda: G.icg(W, 4.0, seeds=range(N)),
    "cfg3_perfect": lambda: G.cfg(W0, 3.0),
    "interval3_perfect": lambda: G.interval(G.cfg(W0, 3.0), 0.28, 1.61),  # EDM2-XXL FID interval
    "cfg8": lambda: G.cfg(W, 8.0),
    "apg8": lambda: G.apg(G.cfg(W, 8.0), eta=0.0),
    "zero_star8": lambda: G.cfg_zero_star(G.cfg(W, 8.0)),
}


@functools.lru_cache(None)
def stats(name: str) -> dict:
    out = samplers.heun(GUIDERS[name](), X0, SIG, cond=COND)
    p, r = metrics.precision_recall(REF, out)
    centre = REF.mean(0)
    return {
        "P": p,
        "R": r,
        "fracA": (A.logp(out) > B.logp(out)).float().mean().item(),
        "overshoot": (out - centre).norm(dim=1).mean().item() - (REF - centre).norm(dim=1).mean().item(),
    }


def test_cfg_raises_class_fraction_and_precision():
    u, c = stats("unguided"), stats("cfg4")
    assert u["fracA"] < 0.8 and c["fracA"] > u["fracA"] + 0.15
    assert c["P"] > u["P"] + 0.1


def test_icg_behaves_like_cfg():
    """ICG (random reference label, no null label needed) moves the samples as CFG does."""
    u, c, i = stats("unguided"), stats("cfg4"), stats("icg4")
    assert i["fracA"] > u["fracA"] + 0.15 and abs(i["fracA"] - c["fracA"]) < 0.05
    assert i["P"] > u["P"] + 0.1 and abs(i["P"] - c["P"]) < 0.05


def test_interval_keeps_more_recall_at_equal_quality():
    """Same weight, guidance only in (0.28, 1.61]: the same precision, clearly more recall."""
    c, i = stats("cfg3_perfect"), stats("interval3_perfect")
    assert i["P"] >= c["P"] - 0.01 and i["fracA"] >= c["fracA"] - 0.01
    assert i["R"] > c["R"] + 0.03


@pytest.mark.parametrize("name", ["apg8", "zero_star8"])
def test_apg_and_cfg_zero_star_reduce_the_overshoot_of_high_weight_cfg(name):
    c, g = stats("cfg8"), stats(name)
    assert c["overshoot"] > 0.05  # CFG at w = 8 pushes samples outwards
    assert abs(g["overshoot"]) < 0.5 * c["overshoot"]
    assert g["fracA"] > stats("unguided")["fracA"] + 0.15  # while still guiding towards class A
