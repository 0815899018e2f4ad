"""`guidelab distill` end to end on a tiny digits teacher: stage 1 (cfg, autoguidance), progressive rounds,
what the checkpoints record for a sampler, resume after an interruption."""

import pytest
import torch
from click.testing import CliRunner

from guidelab import samplers, schedules
from guidelab.app.cli import main
from guidelab.errors import GuidelabError
from guidelab.training import load, load_model
from guidelab.training.distill import (
    distilled_denoiser,
    distilled_info,
    init_from_teacher,
    student_config,
)
from guidelab.training.images import ImageConfig, train_images
from guidelab.training.loop import Trainer

TINY = {"hidden": 16, "depth": 1, "emb": 8, "batch": 16, "iters": 4, "snapshot_every": 2}
FAST = ["--batch", "16", "--snapshot-every", "3", "--checkpoint-every", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny class-conditional digits run folder (4 steps, snapshots at 2 and 4)."""
    final = train_images(tmp_path_factory.mktemp("teacher"), ImageConfig(**TINY), progress=False, plot=False, threads=1)
    return final.parent


def invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if isinstance(res.exception, GuidelabError):
        raise res.exception
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def stage1(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "run"
    res = invoke("distill", teacher, "--out", out, "--w-min", 1, "--w-max", 3, "--iters", 6, *FAST)
    assert "input 'w'" in res.output
    return out


def test_stage1_student_records_its_w_input(stage1):
    student = load_model(stage1 / "ema-0000006-0.05.safetensors")
    assert student.extra_scalar == "w" and student.num_classes == 10
    assert distilled_info(student) == {"key": "w", "w_min": 1.0, "w_max": 3.0, "sampler": None, "sigmas": None}
    meta = student.checkpoint_info["meta"]
    assert meta["recipe"] == "distill" and "cfg of" in meta["teacher"] and meta["images"]["data"] == "digits"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():  # the student is a one-call denoiser at any w
        out = distilled_denoiser(student, 2.0)(x, torch.full((4,), 0.5), label=torch.arange(4))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_student_starts_as_the_unguided_teacher(teacher):
    from guidelab.models import registry
    from guidelab.training.phema import reconstruct

    net = reconstruct(teacher, 0.10)
    with torch.no_grad():  # a real teacher output, not the zero-initialised one
        net.out.weight.normal_(0, 0.1)
    cfg = student_config(net)
    student = registry.build(cfg).eval()
    student.load_state_dict(init_from_teacher(net, cfg))
    x, s, y = torch.randn(8, 1, 8, 8), torch.rand(8) * 3 + 0.05, torch.arange(8)
    with torch.no_grad():
        ref = net(x, s, label=y)
        assert (ref - net(x, s + 1, label=y)).abs().max() > 1e-3  # sigma matters: a non-trivial check
        for w in (1.0, 2.5, torch.linspace(1, 5, 8)):
            torch.testing.assert_close(student(x, s, label=y, w=w), ref, rtol=1e-5, atol=1e-6)


def test_autoguidance_stage1(teacher, tmp_path):
    invoke(
        "distill",
        teacher,
        "--out",
        tmp_path / "ag",
        "--guider",
        "autoguidance",
        "--guide",
        teacher,
        "--guide-step",
        2,
        "--iters",
        2,
        *FAST,
    )
    student = load_model(tmp_path / "ag" / "ema-0000002-0.05.safetensors")
    assert "autoguidance" in student.checkpoint_info["meta"]["teacher"] and "step 2" in student.checkpoint_info["meta"]["teacher"]
    with pytest.raises(GuidelabError, match="needs --guide"):
        invoke("distill", teacher, "--out", tmp_path / "x", "--guider", "autoguidance", "--iters", 2, *FAST)


def test_progressive_rounds_record_their_grid(teacher, stage1, tmp_path):
    res = invoke("distill", stage1, "--progressive", "--from-steps", 8, "--to-steps", 2, "--out", tmp_path, "--iters", 2, *FAST)
    assert "2 Euler steps" in res.output and "4 Euler steps" in res.output
    grid = schedules.karras(8, 0.002, 80).double()
    for k, path in ((4, tmp_path / "steps-4"), (2, tmp_path / "steps-2")):
        student = load_model(path / "ema-0000002-0.05.safetensors")
        info = distilled_info(student)
        assert info["sampler"] == "euler" and info["key"] == "w" and (info["w_min"], info["w_max"]) == (1.0, 3.0)
        assert info["sigmas"] == grid[:: 8 // k].tolist()
        assert student.checkpoint_info["meta"]["teacher_sigmas"] == grid[:: 4 // k].tolist()
        x = 80 * torch.randn(3, 1, 8, 8)
        with torch.no_grad():  # samples on exactly its grid
            out = samplers.euler(
                distilled_denoiser(student, 2.0), x, torch.tensor(info["sigmas"]), cond={"label": torch.arange(3)}
            )
        assert torch.isfinite(out).all()
    # a progressive student continues from its own grid; a contradicting --from-steps is refused
    invoke("distill", tmp_path / "steps-2", "--progressive", "--to-steps", 1, "--out", tmp_path / "more", "--iters", 1, *FAST)
    assert distilled_info(load_model(tmp_path / "more" / "steps-1" / "ema-0000001-0.05.safetensors"))["sigmas"] == [80.0, 0.0]
    with pytest.raises(GuidelabError, match="--from-steps must be"):
        invoke(
            "distill", tmp_path / "steps-2", "--progressive", "--from-steps", 8, "--to-steps", 1, "--out", tmp_path / "bad", *FAST
        )
    with pytest.raises(GuidelabError, match="not a distilled student"):
        invoke(
            "distill",
            teacher / "ema-0000004-0.1.safetensors",
            "--progressive",
            "--from-steps",
            4,
            "--to-steps",
            2,
            "--out",
            tmp_path / "bad",
            *FAST,
        )


class Killed(Exception):
    pass


def test_interrupted_distillation_resumes_to_the_same_weights(teacher, stage1, tmp_path, monkeypatch):
    out = tmp_path / "run"
    step = Trainer.train_step

    def dying(self):
        if self.step == 5:
            raise Killed
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", dying)
    res = CliRunner().invoke(
        main, ["distill", str(teacher), "--out", str(out), "--w-min", "1", "--w-max", "3", "--iters", "6", *FAST]
    )
    assert isinstance(res.exception, Killed)
    assert load(out / "state.safetensors")[1]["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", step)
    invoke("distill", teacher, "--out", out, "--w-min", 1, "--w-max", 3, "--iters", 6, *FAST)
    a, ca = load(stage1 / "state.safetensors")
    b, cb = load(out / "state.safetensors")
    assert ca == cb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (stage1 / "ema-0000006-0.1.safetensors").read_bytes() == (out / "ema-0000006-0.1.safetensors").read_bytes()
    # another teacher setting in the same folder is refused, not silently mixed
    with pytest.raises(GuidelabError, match="another config"):
        invoke("distill", teacher, "--out", out, "--w-min", 1, "--w-max", 4, "--iters", 6, *FAST)


def test_toy_student_starts_as_the_teacher_and_bare_teachers_are_refused():
    from guidelab.models import registry

    torch.manual_seed(0)
    toy = registry.build({"name": "ToyMLP", "hidden": 8, "depth": 1, "output": "denoiser"})
    with torch.no_grad():
        toy.gain.fill_(1.0)
    student = registry.build(student_config(toy))
    student.load_state_dict(init_from_teacher(toy, student_config(toy)))
    x, s = torch.randn(5, 2), torch.rand(5) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(student(x, s, w=3.0), toy(x, s), rtol=1e-5, atol=1e-6)
    bare = registry.build({"name": "PixelMLP", "hidden": 8, "depth": 1, "emb": 4, "num_classes": 0, "noise_cond": False})
    with pytest.raises(GuidelabError, match="init='scratch'"):
        init_from_teacher(bare, student_config(bare))
