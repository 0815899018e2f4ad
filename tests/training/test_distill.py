"""Guidance distillation, stage 1 (training/distill.py), checked against the exact 2-D tree world."""

import pytest
import torch

from guidelab import guidance, samplers, schedules, toy
from guidelab.denoisers import EDMPrecond
from guidelab.errors import GuidelabError
from guidelab.training import load_model
from guidelab.training.distill import (
    DistillConfig,
    Runtime,
    distill_loss,
    distill_student,
    distilled_denoiser,
    progressive_loss,
    progressive_round,
)
from guidelab.training.loop import LoopConfig, step_generator

A, AB = toy.tree("A"), toy.tree("AB")
TAU = 0.4  # blur of the exact autoguidance guide


def blurred_a(x, sigma, **cond):
    """Exact denoiser of the tree A convolved with N(0, TAU^2): a weaker model of A (an autoguidance guide).

    Its noisy density at sigma is A's at s = sqrt(sigma^2 + TAU^2), so its score is A's score at s and
    Tweedie gives D = x + sigma^2 / s^2 (D_A(x; s) - x).
    """
    s = (sigma**2 + TAU**2).sqrt()
    r = (sigma**2 / s**2)[:, None]
    return x + r * (A(x, s) - x)


GUIDERS = {"cfg": lambda w: guidance.cfg(A, w, uncond=AB), "autoguidance": lambda w: guidance.autoguidance(A, blurred_a, w)}


def data_a(batch, gen):
    return A.sample(batch, 0.0, generator=gen)


class TeacherAsStudent(torch.nn.Module):
    """A "student" that IS the guided teacher: ``D(x; sigma, w) = guider(w)(x; sigma)``."""

    def __init__(self, guider, ignore_w=False):
        super().__init__()
        self.guider, self.ignore_w, self.precond, self.ws = guider, ignore_w, EDMPrecond(0.5), []

    def forward(self, x, sigma, w):
        self.ws.append(w)
        return self.guider(torch.ones_like(w) if self.ignore_w else w)(x, sigma)


@pytest.mark.parametrize("name", sorted(GUIDERS))
def test_loss_is_zero_when_the_student_is_the_teacher(name):
    cfg = DistillConfig(w_min=1.0, w_max=4.0)
    loss_fn = distill_loss(GUIDERS[name], data_a, cfg)
    student = TeacherAsStudent(GUIDERS[name])
    loss = loss_fn(student, 64, step_generator(0, 0))
    assert loss.shape == (64,)
    assert torch.equal(loss, torch.zeros(64))
    (w,) = student.ws
    assert w.shape == (64,) and 1.0 <= w.min() and w.max() <= 4.0 and w.std() > 0.5  # per-sample U[1, 4]
    # A student that ignores w (always unguided) does not match: the loss can fail.
    assert (
        distill_loss(GUIDERS[name], data_a, cfg)(TeacherAsStudent(GUIDERS[name], ignore_w=True), 64, step_generator(0, 0)).mean()
        > 1e-2
    )


def test_config_errors():
    with pytest.raises(GuidelabError, match="w_min <= w_max"):
        DistillConfig(w_min=3.0, w_max=2.0)
    model = {"name": "ToyMLP", "dim": 2, "output": "denoiser"}
    with pytest.raises(GuidelabError, match="extra_scalar='w'"):
        distill_student("unused", model, GUIDERS["cfg"], data_a)


def test_distilled_student_samples_with_one_call_per_evaluation():
    from guidelab.models.mlp import ToyMLP

    torch.manual_seed(0)
    net = ToyMLP(hidden=16, depth=1, output="denoiser", extra_scalar="w").eval()
    with torch.no_grad():
        net.gain.fill_(1.0)
    calls, evals = [], []

    def counting(x, sigma, **cond):
        calls.append((x.shape[0], cond["w"].clone()))
        return net(x, sigma, **cond)

    D = distilled_denoiser(counting, 3.0)

    def counted_D(x, sigma, **cond):
        evals.append(x.shape[0])
        return D(x, sigma, **cond)

    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(1)) * 5
    with torch.no_grad():
        out = samplers.heun(counted_D, x, schedules.karras(6, 0.002, 5))
    assert out.shape == (10, 2) and torch.isfinite(out).all()
    assert len(evals) > 0 and len(calls) == len(evals)  # one network call per evaluation
    assert all(b == 10 and torch.equal(w, torch.full((10,), 3.0)) for b, w in calls)  # not a doubled batch
    with torch.no_grad():  # w changes the output; a per-sample w tensor is passed through
        s = torch.full((10,), 0.5)
        assert not torch.allclose(distilled_denoiser(net, 1.0)(x, s), distilled_denoiser(net, 3.0)(x, s))
        w = torch.linspace(1, 4, 10)
        assert torch.equal(distilled_denoiser(net, w)(x, s), net(x, s, w=w))


CFG = DistillConfig(w_min=1.0, w_max=4.0, P_mean=-1.0, P_std=1.0)


# Training budget per teacher; the largest ratio err / effect below (limit 0.2) measured at each budget:
# cfg 0.038 at 400 steps (0.019 at 800), autoguidance 0.10 at 600 (0.09 at 800, 0.20 at 400).
ITERS = {"cfg": 400, "autoguidance": 600}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """``get(name)``: the path of a small ToyMLP (w input) distilled from the exact guider ``name`` (trained once)."""
    model = {
        "name": "ToyMLP",
        "dim": 2,
        "hidden": 64,
        "depth": 3,
        "sigma_data": 0.5,
        "num_classes": 0,
        "output": "denoiser",
        "noise_cond": True,
        "extra_scalar": "w",
    }
    cache = {}

    def get(name):
        if name not in cache:
            n = ITERS[name]
            loop = LoopConfig(iters=n, batch=256, lr=0.01, lr_ref_steps=n // 4, ema=(0.05,), snapshot_every=n)
            cache[name] = distill_student(
                tmp_path_factory.mktemp(name),
                model,
                GUIDERS[name],
                data_a,
                CFG,
                loop,
                teacher=f"exact tree A, {name}",
                runtime=Runtime(progress=False, checkpoint_every=n),
            )
        return cache[name]

    return get


# autoguidance's student goes through the same distill_student path with another teacher: the slow set
@pytest.mark.parametrize("name", ["cfg", pytest.param("autoguidance", marks=pytest.mark.slow)])
def test_student_tracks_the_guided_teacher_on_the_tree(name, distilled):
    """Distil exact CFG (A vs AB) / exact autoguidance (A vs blurred A) into a small ToyMLP with a w input."""
    guider = GUIDERS[name]
    student = load_model(distilled(name))
    g = torch.Generator().manual_seed(123)
    n = 2000
    sigma = torch.empty(n).uniform_(-2.3, 0.0, generator=g).exp()  # sigma in [0.1, 1]
    x = A.sample(n, sigma, generator=g)
    with torch.no_grad():
        for w in (2.0, 3.0):
            s, t_w, t_1 = distilled_denoiser(student, w)(x, sigma), guider(w)(x, sigma), A(x, sigma)
            err, effect = (s - t_w).square().sum(1).mean(), (t_w - t_1).square().sum(1).mean()
            print(f"{name} w={w}: |student - teacher_w|^2 = {err:.2e}, |teacher_w - teacher_1|^2 = {effect:.2e}")
            # closer to the teacher at w than to the unguided teacher, by a wide margin
            assert err < 0.2 * effect, (w, err.item(), effect.item())
            assert err < 0.2 * (s - t_1).square().sum(1).mean()


def test_progressive_loss_is_zero_for_a_linear_ode():
    """If D does not depend on x (D = c), the PF-ODE is linear in sigma: two Euler steps = one, so a student
    equal to the teacher has zero loss; a different student does not."""

    class Const(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c, self.precond = c, EDMPrecond(0.5)

        def forward(self, x, sigma, w):
            return self.c * w[:, None] * torch.ones_like(x)

    sigmas = schedules.karras(8, 0.002, 5)
    loss = progressive_loss(Const(0.3), sigmas, data_a, CFG)
    assert loss(Const(0.3), 64, step_generator(0, 0)).abs().max() < 1e-6
    assert loss(Const(0.1), 64, step_generator(0, 0)).min() > 1e-3
    with pytest.raises(GuidelabError, match="even number of steps"):
        progressive_loss(Const(0.3), schedules.karras(7, 0.002, 5), data_a, CFG)


def test_progressive_round_halves_the_steps(distilled, tmp_path):
    """Stage 2 on the tree: a 4-step student of the distilled-CFG teacher's 8-step Euler sampler lands
    closer to the teacher's 8-step samples than the teacher itself does in 4 steps (largest ratio 0.064
    with the 400-step teacher, 0.059 with an 800-step one; limit 0.25)."""
    teacher_path = distilled("cfg")
    sigmas = schedules.karras(8, 0.002, 5)
    loop = LoopConfig(iters=300, batch=256, lr=0.003, lr_ref_steps=100, ema=(0.05,), snapshot_every=300)
    path = progressive_round(
        tmp_path, teacher_path, sigmas, data_a, CFG, loop, runtime=Runtime(progress=False, checkpoint_every=300)
    )
    teacher, student = load_model(teacher_path), load_model(path)
    x = 5 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for w in (1.0, 3.0):
            t8 = samplers.euler(distilled_denoiser(teacher, w), x, sigmas)
            t4 = samplers.euler(distilled_denoiser(teacher, w), x, sigmas[::2])
            s4 = samplers.euler(distilled_denoiser(student, w), x, sigmas[::2])
            err, base = (s4 - t8).square().sum(1).mean(), (t4 - t8).square().sum(1).mean()
            print(f"w={w}: |student4 - teacher8|^2 = {err:.2e}, |teacher4 - teacher8|^2 = {base:.2e}")
            assert err < 0.25 * base, (w, err.item(), base.item())
