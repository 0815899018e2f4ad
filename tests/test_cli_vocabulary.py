"""One CLI vocabulary (issue 15): the same options on every command that computes, device and install
errors as one line, errors in CLI words, one PNG naming, sweep's --guide (and the deprecated --uncond)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab.app import cli, jobs
from guidelab.errors import GuidelabError

#: command -> options it must have.
COMPUTING = {  # (commands of app/commands/ belong to their helpers)
    "sample": {"threads", "quiet", "device", "allow_nonfinite", "dtype", "seed_start", "out", "label", "unconditional", "guide"},
    "sweep": {"threads", "quiet", "device", "allow_nonfinite", "dtype", "seed_start", "out", "label", "unconditional", "guide"},
    "evaluate": {
        "threads",
        "quiet",
        "device",
        "allow_nonfinite",
        "dtype",
        "seed_start",
        "out",
        "label",
        "unconditional",
        "guide",
    },
    "demo": {"threads", "quiet", "allow_nonfinite", "out", "seed"},
    "train": {"threads", "quiet", "device", "out"},
    "distill": {"threads", "quiet", "device", "out", "guide"},
    "classifier": {"threads", "quiet", "out"},
    "diffusers": {"threads", "quiet", "device", "allow_nonfinite", "allow_bin", "dtype", "seeds", "out", "label", "guide"},
    "generate": {"threads", "quiet", "device", "allow_nonfinite", "allow_bin", "dtype", "seeds", "out", "guide"},
    "inverse": {"threads", "quiet", "allow_nonfinite", "out", "seed"},
}


def _params(name):
    return {p.name: p for p in cli.main.commands[name].params}


@pytest.mark.parametrize("name", sorted(COMPUTING))
def test_every_computing_command_has_the_shared_options(name):
    params = _params(name)
    missing = COMPUTING[name] - set(params)
    assert not missing, f"{name} lacks {sorted(missing)}"
    for key in ("threads", "quiet", "allow_nonfinite", "allow_bin", "device"):
        if key in params:  # same flag, same meaning: the shared definition (help text, device check)
            assert params[key].opts == [f"--{key.replace('_', '-')}"]
            if key == "device":
                assert params[key].callback is cli._device
            else:
                assert params[key].help == _params("sample" if key != "allow_bin" else "diffusers")[key].help
    for p in params.values():
        assert p.param_type_name == "argument" or p.help or p.opts == ["--help"], f"{name} {p.opts} has no help"


def test_weight_option_is_shared_and_takes_schedules():
    for name in ("sample", "evaluate", "diffusers"):
        assert _params(name)["w"].help == cli._WEIGHT_HELP


def _invoke(args):
    r = CliRunner().invoke(cli.main, args)
    text = r.output + (r.stderr if r.stderr_bytes is not None else "")
    if isinstance(r.exception, GuidelabError):
        text += f"error: {r.exception}"
    return r, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["sample", "--out", "{out}"], ["evaluate", "x.safetensors", "--out", "{out}"]])
def test_device_cuda_without_cuda_is_one_error_line(tmp_path, command):
    r, text = _invoke([a.format(out=tmp_path / "o") for a in command] + ["--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA device" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_missing_diffusers_install_is_one_error_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    for args in (["diffusers", str(tmp_path), "--out", str(tmp_path / "o")], ["generate", str(tmp_path), "--prompt", "x"]):
        r, text = _invoke(args + (["--out", str(tmp_path / "o")] if args[0] == "generate" else []))
        assert isinstance(r.exception, GuidelabError) and "needs the diffusers package" in str(r.exception), text


def test_diffusers_label_beyond_the_models_classes_is_refused(tmp_path):
    (tmp_path / "dit" / "transformer").mkdir(parents=True)
    (tmp_path / "dit" / "transformer" / "config.json").write_text(json.dumps({"num_embeds_ada_norm": 1000}))
    r, text = _invoke(["diffusers", str(tmp_path / "dit"), "--out", str(tmp_path / "o"), "--label", "5000"])
    assert isinstance(r.exception, GuidelabError) and "--label 5000 out of range" in text and "1000 classes" in text
    assert not (tmp_path / "o").exists()


def test_library_keyword_advice_is_reworded_in_cli_options():
    msg = "cfg_weight needs the null condition: pass null_label=... (class models) or null_text=... (text models); x"
    assert "--null-label" in cli.cli_words(msg) and "null_label=" not in cli.cli_words(msg)
    assert "--option num_classes=N" in cli.cli_words("icg needs num_classes >= 2 (pass num_classes=...)")
    assert cli.cli_words("plain message") == "plain message"


def test_cfg_without_null_label_speaks_in_cli_options(tmp_path):
    from guidelab.models.image import PixelMLP
    from guidelab.training import save_model

    torch.manual_seed(0)
    path = save_model(tmp_path / "u.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0))
    r, text = _invoke(["sample", "--model", str(path), "--guider", "cfg", "--weight", "2", "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, GuidelabError)
    assert "=..." not in str(r.exception) and "--" in str(r.exception), str(r.exception)


def test_png_names_come_from_one_helper(tmp_path):
    assert jobs.png_name(7) == "000000007.png" and jobs.png_path(tmp_path, 7) == tmp_path / "png" / "000000007.png"


def test_sweep_guide_per_method_and_the_deprecated_uncond(tmp_path):
    from guidelab.app.cli import _sweep_guides

    assert _sweep_guides(("a.st",), ["cfg"]) == ("a.st", {})
    assert _sweep_guides(("cfg=u.st", "autoguidance=g.st"), ["cfg", "autoguidance"]) == (
        None,
        {"cfg": "u.st", "autoguidance": "g.st"},
    )
    with pytest.raises(GuidelabError, match="not one of --methods"):
        _sweep_guides(("icg=x",), ["cfg"])
    with pytest.raises(GuidelabError, match="twice"):
        _sweep_guides(("a", "b"), ["cfg"])
    # --uncond still works on a model (the cfg cell gets it) and warns that it is deprecated
    from guidelab.models.image import PixelMLP
    from guidelab.training import save_model

    torch.manual_seed(0)
    m = save_model(tmp_path / "m.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0, img_channels=1))
    u = save_model(tmp_path / "u.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0, img_channels=1))
    ref = tmp_path / "ref.npz"
    np.savez(ref, samples=np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32))
    common = ["sweep", "--model", str(m), "--methods", "cfg", "--weights", "2", "--samples", "16", "--steps", "2"]
    common += ["--reference", str(ref), "--quiet"]
    r = CliRunner().invoke(cli.main, common + ["--uncond", str(u), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "--uncond is deprecated; use --guide cfg=" in (r.stderr if r.stderr_bytes is not None else r.output)
    r2 = CliRunner().invoke(cli.main, common + ["--guide", f"cfg={u}", "--out", str(tmp_path / "b")])
    assert r2.exit_code == 0, r2.output
    a, b = (jobs.load_samples(tmp_path / x / "samples" / "cfg_w2")[0] for x in ("a", "b"))
    assert np.array_equal(a, b)  # the alias means exactly --guide cfg=PATH
    job = json.loads((tmp_path / "b" / "samples" / "cfg_w2" / "job.json").read_text())
    assert job["config"]["guide"] == str(u)


def test_allow_bin_reaches_the_loaders(tmp_path, monkeypatch):
    from guidelab.app import diffusers_generate as dg

    seen = {}
    monkeypatch.setattr(dg, "generate", lambda model_dir, **kw: seen.setdefault("diffusers", kw))
    monkeypatch.setattr(dg, "generate_images", lambda folder, prompts, **kw: seen.setdefault("generate", kw))
    for flag in ([], ["--allow-bin"]):
        seen.clear()
        r1 = CliRunner().invoke(cli.main, ["diffusers", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet", *flag])
        r2 = CliRunner().invoke(
            cli.main, ["generate", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "g"), "--quiet", *flag]
        )
        assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
        assert seen["diffusers"]["allow_pickle"] is bool(flag) and seen["generate"]["allow_pickle"] is bool(flag)
        assert seen["diffusers"]["progress"] is False and seen["generate"]["progress"] is False  # --quiet


def test_diffusers_and_generate_report_progress_unless_quiet(tmp_path, monkeypatch):
    from guidelab.app import diffusers_generate as dg

    seen = {}
    monkeypatch.setattr(dg, "generate", lambda model_dir, **kw: seen.setdefault("diffusers", kw))
    monkeypatch.setattr(dg, "generate_images", lambda folder, prompts, **kw: seen.setdefault("generate", kw))
    r1 = CliRunner().invoke(cli.main, ["diffusers", str(tmp_path), "--out", str(tmp_path / "o")])
    r2 = CliRunner().invoke(cli.main, ["generate", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "g")])
    for r, key in ((r1, "diffusers"), (r2, "generate")):
        err = r.stderr if r.stderr_bytes is not None else r.output
        assert r.exit_code == 0 and seen[key]["progress"] is True  # the sampler's bar
        assert "loading" in err and "CPU thread" in err  # phase line and the thread choice before it


def test_dtype_spellings_mean_the_same_in_diffusers_and_generate(tmp_path, monkeypatch):
    from guidelab.app import diffusers_generate as dg

    seen = {}
    monkeypatch.setattr(dg, "generate", lambda model_dir, **kw: seen.setdefault("diffusers", kw))
    monkeypatch.setattr(dg, "generate_images", lambda folder, prompts, **kw: seen.setdefault("generate", kw))
    for spelling in ("bf16", "bfloat16"):
        seen.clear()
        CliRunner().invoke(cli.main, ["diffusers", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet", "--dtype", spelling])
        CliRunner().invoke(
            cli.main, ["generate", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "g"), "--quiet", "--dtype", spelling]
        )
        assert seen["diffusers"]["dtype"] == "bfloat16" and seen["generate"]["dtype"] == "bf16"
