import pytest
import torch
from counting import Counting, inputs

from guidelab import guidance, samplers, schedules, toy
from guidelab.errors import GuidelabError


def _inputs(B=8):
    return inputs(B)


def test_w1_is_bit_identical_and_costs_one_call():
    x, sigma, label = _inputs()
    net, guide = Counting(), Counting()
    ref = net(x, sigma, label=label)
    net.calls.clear()
    for g in (guidance.cfg(net, 1.0), guidance.cfg(net, 1, uncond=guide), guidance.autoguidance(net, guide, 1.0)):
        assert torch.equal(g(x, sigma, label=label), ref)
    assert len(net.calls) == 3 and not guide.calls


def test_cfg_same_network_is_one_batched_call_equal_to_separate_calls():
    x, sigma, label = _inputs()
    net = Counting()
    out = guidance.cfg(net, 3.0)(x, sigma, label=label)
    assert len(net.calls) == 1 and net.calls[0][0] == 16
    assert torch.equal(net.calls[0][1][8:], torch.full((8,), 2))  # the null label fills the reference half
    D_c, D_u = net(x, sigma, label=label), net(x, sigma, label=torch.full_like(label, 2))
    torch.testing.assert_close(out, D_u + 3.0 * (D_c - D_u), rtol=1e-12, atol=1e-12)


def test_autoguidance_and_separate_uncond_formula():
    x, sigma, label = _inputs()
    net, guide = Counting(), lambda x, sigma, **c: 0.5 * x
    D = net(x, sigma, label=label)
    torch.testing.assert_close(guidance.autoguidance(net, guide, 2.5)(x, sigma, label=label), 0.5 * x + 2.5 * (D - 0.5 * x))
    # A separate unconditional network is called without the label (EDM2's CFG).
    seen = {}

    def uncond(x, sigma, **cond):
        seen.update(cond)
        return 0.5 * x

    guidance.cfg(net, 2.0, uncond=uncond)(x, sigma, label=label)
    assert "label" not in seen


def test_per_sample_weights():
    x, sigma, label = _inputs()
    net, guide = Counting(), lambda x, sigma, **c: 0.5 * x
    w = torch.tensor([1.0, 2, 3, 4, 1, 2, 3, 4], dtype=torch.float64)
    out = guidance.autoguidance(net, guide, w)(x, sigma, label=label)
    for i in range(8):
        one = guidance.autoguidance(net, guide, float(w[i]))(x[i : i + 1], sigma[i : i + 1], label=label[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], one, rtol=1e-12, atol=1e-12)


def test_batched_branches_fall_back_when_not_batchable():
    x, sigma, label = _inputs()
    net = Counting()
    a = guidance.Branch(net)
    b = guidance.Branch(net, {"label": guidance.DROP})
    calls = []

    def flexible(x, sigma, label=None):
        calls.append(label is None)
        return x

    outs = guidance.evaluate(
        [guidance.Branch(flexible), guidance.Branch(flexible, {"label": guidance.DROP})], x, sigma, {"label": label}
    )
    assert calls == [False, True] and len(outs) == 2
    with pytest.raises(TypeError):  # Counting requires a label: dropping it is the network's error, not ours.
        guidance.evaluate([a, b], x, sigma, {"label": label})


def test_guided_exact_world_sampling_runs_and_autoguidance_with_itself_is_identity():
    A = toy.tree("A", dtype=torch.float64)
    sig = schedules.karras(8, 0.002, 5.0)
    x = A.sample(64, 5.0, generator=torch.Generator().manual_seed(0))
    plain = samplers.heun(A, x, sig)
    same = samplers.heun(guidance.autoguidance(A, A, 3.0), x, sig)  # D_ref == D: guidance cancels
    torch.testing.assert_close(same, plain, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("w", [float("nan"), float("inf"), "2", None])
def test_bad_weight(w):
    with pytest.raises(GuidelabError):
        guidance.autoguidance(toy.tree("A"), toy.tree("AB"), w)


def test_cfg_without_null_is_clear_error():
    with pytest.raises(ValueError, match="null"):
        guidance.cfg(lambda x, sigma, **c: x, 2.0)
