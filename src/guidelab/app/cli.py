"""The ``guidelab`` command line: a thin layer over importable functions."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from pathlib import Path

import click

from ..errors import GuidelabError, check
from ..guidance import registry
from ..training.distill import GUIDERS as DISTILL_GUIDERS
from .jobs.config import GUIDERS

#: Guiders of diffusers models: the registry's entries whose needs a diffusers model can meet.
DIFFUSERS_GUIDERS = tuple(registry.names(needs={"null_label", "condition", "guide", "noise_embed", "attention"}))


#: Library messages that name Python keywords, in the CLI's words (errors speak in CLI options).
_CLI_WORDS = (
    (
        re.compile(r"pass null_label=\.\.\. \(class models\) or null_text=\.\.\. \(text models\)"),
        "give --null-label N (class models) or --prompt-embeds with null_embeds (text models)",
    ),
    (re.compile(r"pass null=\.\.\. or uncond=<network>"), "give --guide <an unconditional model>"),
    (re.compile(r"pass layers=\.\.\. or 'all'"), "give --layers NAME,... or --layers all"),
    (re.compile(r"pass dim=\.\.\. or form='scalar'"), "give --option dim=N or --option form=scalar"),
    (re.compile(r"pass num_classes=\.\.\."), "give --option num_classes=N"),
    (re.compile(r"allow_pickle=True \(CLI: --allow-bin\)"), "--allow-bin"),
    (re.compile(r"\blabel= / --label\b"), "--label"),
    (re.compile(r"\bguidance=(?= |\))"), "--guidance"),
)


def cli_words(message: str) -> str:
    """``message`` with the Python keyword advice of :data:`_CLI_WORDS` replaced by CLI options."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


class _Group(click.Group):
    """An OS refusal to read or write a path (missing, unwritable, a full disk) in any command becomes a
    GuidelabError: :func:`run` prints every GuidelabError as one ``error:`` line with exit code 2. Library
    messages are reworded in CLI options (:func:`cli_words`); the command line is kept for provenance."""

    def parse_args(self, ctx, args):
        from . import provenance

        provenance.set_command(["guidelab", *args])
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from .. import log

        try:
            out = super().invoke(ctx)
            log.release()
            return out
        except GuidelabError as e:
            log.discard()  # held phase lines: a refused command prints its error alone
            text = cli_words(str(e))
            if text == str(e):
                raise
            raise GuidelabError(text) from None
        except OSError as e:  # a path that cannot be read or written
            if e.filename is None and e.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
                log.release()
                raise
            log.discard()
            raise GuidelabError(f"cannot read or write {e.filename or 'the output'}: {e.strerror or e}") from None
        except BaseException:  # a usage error, Ctrl-C, a bug: what was held comes out before it
            log.release()
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="guidelab")
def main() -> None:
    """guidelab: guiding diffusion models (CFG, autoguidance, ...) behind one contract."""


@main.command("samplers")
def list_samplers() -> None:
    """List the available samplers."""
    from .. import samplers

    for name in samplers.names():
        click.echo(name)


@main.command("guiders")
def list_guiders() -> None:
    """List the guiders of the registry: what each needs, its NFE per denoiser call, its --option keys."""
    for name in registry.names():
        s = registry.get(name)
        opts = ", ".join(f"{o.name}={o.default!r}" for o in s.options) or "-"
        click.echo(f"{name:14} nfe {s.nfe}  needs {', '.join(sorted(s.needs)) or '-'}  options {opts}  ({s.summary})")


_GUIDE_HELP = (
    "Guide: the weaker model (autoguidance, checkpoint or run folder), the unconditional model "
    "(cfg; default: the null label), the noise-aware classifier (classifier; default: the packaged noise-aware digits one)."
)


def _value(text: str):
    """A ``--sampler-option`` value: an int, a float, true / false, or the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _sampler_options(ctx, param, values) -> dict:
    """``--sampler-option KEY=VALUE ...`` -> ``{key: value}`` (values: :func:`_value`)."""
    out: dict = {}
    for text in values:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE (e.g. order=2 or ems=m.ems.safetensors), got {text!r}")
        if key in out:
            raise click.BadParameter(f"{key} is given twice")
        out[key] = _value(value.strip())
    return out


def _how_options(f, sweep: bool = False):
    """How to sample (``sample``, ``sweep``, ``evaluate``; see guidelab.app.jobs.SampleConfig). ``sweep``:
    --guide is repeatable and may name its method (``--guide cfg=UNCOND``)."""
    guide = (
        click.option(
            "--guide",
            "guide",
            multiple=True,
            metavar="[METHOD=]PATH",
            help=_GUIDE_HELP + " Repeatable: METHOD=PATH gives one method its own guide "
            "(e.g. --guide autoguidance=RUN --guide cfg=UNCOND.safetensors); a bare PATH serves every method.",
        )
        if sweep
        else click.option("--guide", type=click.Path(), default=None, help=_GUIDE_HELP)
    )
    opts = [
        guide,
        click.option("--label", default=None, help="Class label: an integer, or 'balanced' (seed % classes)."),
        click.option(
            "--unconditional",
            is_flag=True,
            help="Call the network without the label (its null label); --label stays the target of classifier guidance.",
        ),
        click.option(
            "--sampler",
            default=None,
            help="Sampler name (guidelab samplers; default heun, or euler on a distilled student's own grid).",
        ),
        click.option("--steps", type=click.IntRange(min=2), default=32, help="Karras schedule steps."),
        click.option("--sigma-min", type=float, default=0.002, help="Smallest nonzero sigma of the Karras schedule."),
        click.option("--sigma-max", type=float, default=None, help="Default: 80 for image models, 5 otherwise."),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float64"]),
            default="float32",
            help="Sampling precision (networks and samples).",
        ),
        click.option("--sigma-rel", type=float, default=0.10, help="A run folder as model: its post-hoc EMA length."),
        click.option("--step", type=click.IntRange(min=1), default=None, help="A run folder as model: the step (default last)."),
        click.option("--guide-sigma-rel", type=float, default=0.10, help="A run folder as guide: its post-hoc EMA length."),
        click.option("--guide-step", type=click.IntRange(min=1), default=None, help="A run folder as guide: the step."),
        click.option(
            "--option",
            "options",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"Guider keyword (repeatable), checked against the guider's options: {_option_help(GUIDERS)}.",
        ),
        click.option(
            "--sampler-option",
            "sampler_options",
            multiple=True,
            metavar="KEY=VALUE",
            callback=_sampler_options,
            help="Sampler keyword (repeatable; a number, true / false, or text), checked against the sampler's keywords: "
            "e.g. s_churn=40 (heun), order=2 (unipc), ems=PATH|degenerate (dpm_solver_v3; default: "
            "MODEL.ems.safetensors next to the checkpoint, written by `guidelab ems MODEL`).",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _sample_options(f, sweep: bool = False):
    """Options shared by ``sample`` and ``sweep``: what to sample (--world, --model) and how."""
    f = _how_options(f, sweep)
    f = click.option(
        "--model",
        type=click.Path(),
        default=None,
        help="Model: a checkpoint (.safetensors, or an NVlabs EDM2 .pkl) or a training run folder (post-hoc EMA).",
    )(f)
    return click.option("--world", default=None, help="Exact tree to sample: A, B or AB (default A when no --model).")(f)


def _option_help(names) -> str:
    """``guider: key (type, default), ...`` for the guiders that take options."""
    out = []
    for n in names:
        opts = registry.get(n).options
        if opts:
            out.append(f"{n} " + ", ".join(f"{o.name}={o.default!r}" for o in opts))
    return "; ".join(out)


class _Guider(click.Choice):
    """A guider name of the registry; an unknown one is a GuidelabError (one line, exit code 2)."""

    def convert(self, value, param, ctx):
        check(value in self.choices, f"unknown guider {value!r}; allowed: {', '.join(self.choices)}")
        return value


def _guider_option(names):
    return click.option(
        "--guider", type=_Guider(list(names)), default="none", help=f"Guider (guidance.registry): {registry.summaries(names)}."
    )


def _device(ctx, param, value):
    """A torch device string (cpu, cuda, cuda:1, ...) or None."""
    if value is None:
        return None
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"not a torch device: {value!r}; allowed: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value}: this torch build or machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ..)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise click.BadParameter(f"{value}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise click.BadParameter(f"{value}: allowed devices are cpu, cuda, cuda:N, mps")
    return value


def _device_option(default=None, what: str = "Device"):
    return click.option(
        "--device",
        default=default,
        callback=_device,
        help=f"{what} (cpu, cuda, cuda:N, mps)" + ("; default cuda if available, else cpu." if default is None else "."),
    )


def _threads_option(f):
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="Torch CPU threads. Default: chosen from the machine and the model size (models of at most "
        "5 M parameters: one thread per process, many times faster on a busy machine); the choice is logged.",
    )(f)


def _quiet_option(f):
    return click.option("--quiet", is_flag=True, help="No progress bars or phase lines (warnings and errors only).")(f)


def _nonfinite_option(f):
    return click.option(
        "--allow-nonfinite",
        is_flag=True,
        help="Write NaN / inf samples instead of stopping at the first step where the denoiser returns them.",
    )(f)


def _allow_bin_option(f):
    return click.option(
        "--allow-bin",
        is_flag=True,
        help="Also load pickled .bin weights (unpickling can run code: only for files you trust); default: safetensors only.",
    )(f)


#: Seconds the first phase lines are held at most (a command refused in that time prints only its error
#: line; a command whose work starts earlier prints them then, before its progress bar).
HOLD = 8.0


def _setup(quiet: bool, threads: int | None, parameters: int | None = None, processes: int | None = None) -> int:
    """What every computing command does first: guidelab's log lines on stderr (``--quiet``: warnings
    only), then the torch thread count (``--threads`` or the default of :func:`guidelab.threads.set_threads`),
    and glibc keeping freed blocks in the heap (:func:`~guidelab.training.loop.keep_freed_memory`: no page faults
    for activations allocated anew each call; -4 to -8 % sampling time at batch >= 1024, results bit-identical)."""
    from .. import log
    from ..threads import set_threads
    from ..training.loop import keep_freed_memory

    log.enable(quiet=quiet, hold=HOLD)
    keep_freed_memory()
    procs = processes if processes is not None else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return set_threads(threads, parameters=parameters, processes=procs)


def _release() -> None:
    """Print the held phase lines now (the work is about to start and show its own bar)."""
    from .. import log

    log.release()


def _phase(text: str) -> None:
    """A phase line on the ``guidelab`` logger (silenced by --quiet)."""
    from ..log import get_logger

    get_logger("guidelab.cli").info("%s", text)


def _parameters(path) -> int | None:
    """Parameters of a checkpoint (.safetensors header, no weights read), of a run folder (its smallest
    checkpoint) or of a diffusers folder / other weight file (bytes / 4); None when unknown."""
    if path is None:
        return None
    p = Path(path)
    try:
        if p.is_dir():
            found = [n for n in (_parameters(f) for f in sorted(p.rglob("*.safetensors"))[:64]) if n]
            if found and not (p / "model_index.json").exists() and not (p / "config.json").exists():
                return min(found)
            weights = [f for f in p.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pkl")]
            return sum(f.stat().st_size for f in weights) // 4 or None
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return p.stat().st_size // 4 if p.is_file() else None
    except Exception:  # unreadable: the command's own checks report it
        return None


def _npz_samples(path):
    """The ``samples`` array of a reference .npz (numbers only: object arrays are refused, never unpickled)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as d:
            check("samples" in d.files, f"--reference {path} has no 'samples' array (it has {d.files})")
            x = d["samples"]
    except (OSError, ValueError, EOFError) as e:
        raise GuidelabError(f"cannot read --reference {path} as an .npz of numbers: {str(e).splitlines()[0]}") from None
    check(
        x.dtype.kind in "fiu" and x.ndim >= 2,
        f"--reference samples must be a numeric array [N, ...], got {x.dtype} {list(x.shape)}",
    )
    return x


_WEIGHT_HELP = (
    "Guidance weight (1 = no guidance), or a schedule KIND:START-END[:key=value,...]: linear:1-4, "
    "cosine:4-1:over=sigma, interval:2-1:sigma_lo=0.3,sigma_hi=5, steps:2-1:start=17,stop=22 "
    "(START at the first, largest sigma; guidance.weight_schedule)."
)


def _weight(ctx, param, value):
    """``--weight``: a float, or the text of a weight schedule (checked by guidance.parse_weight)."""
    from ..guidance import parse_weight

    if value is None:
        return None
    w = parse_weight(str(value))
    return w if isinstance(w, float) else str(value).strip()


def _weight_option(default: str = "1"):
    return click.option("--weight", "w", default=default, callback=_weight, help=_WEIGHT_HELP)


def _parsed(w):
    """A --weight value as guiders take it: a float, or the WeightSchedule its text describes."""
    from ..guidance import parse_weight

    return parse_weight(w) if isinstance(w, str) else w


def _given(name: str) -> bool:
    """Whether option ``name`` (the parameter's name) was given on the command line."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def _check_run_folder_options(model, guide) -> None:
    """--sigma-rel / --guide-sigma-rel pick a post-hoc EMA of a run folder: given with a checkpoint file they cannot apply."""
    for flag, name, path, what in (
        ("--sigma-rel", "sigma_rel", model, "--model"),
        ("--guide-sigma-rel", "guide_sigma_rel", guide, "--guide"),
    ):
        if _given(name):
            check(
                path is not None and Path(path).is_dir(),
                f"{flag} picks the post-hoc EMA of a training run folder; {what} {path or '(none)'} is not one "
                f"(a checkpoint file has its EMA baked in): drop {flag}",
            )


def _config(world, model, label=None, options=(), guider="none", **kw):
    from .jobs import SampleConfig

    _check_run_folder_options(model, kw.get("guide"))
    if label is not None and label != "balanced":
        try:
            label = int(label)
        except ValueError:
            raise GuidelabError(f"--label must be an integer or 'balanced', got {label!r}") from None
    cfg = SampleConfig(
        world=world if (world or model) else "A",
        model=model,
        label=label,
        guider=guider,
        guider_options=registry.parse_options(guider, options),
        **kw,
    )
    cfg.validate()  # before any log line: a refused command prints only its error
    return cfg


_NUMBER = r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf)\s*"


def _interval(text, flag: str = "--interval"):
    """``lo-hi`` -> (lo, hi); numbers may carry exponents (``1e-3-5``: lo = 0.001, hi = 5)."""
    import re

    if not text:
        return None
    m = re.fullmatch(_NUMBER + "-" + _NUMBER, text)
    check(m is not None, f"{flag} must look like lo-hi (e.g. 0.3-5 or 1e-3-5), got {text!r}")
    return float(m.group(1)), float(m.group(2))


@main.command("sample")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder of shards.")
@click.option("--samples", "n", type=click.IntRange(min=1), default=4096, help="Number of samples (seeds seed-start ...).")
@click.option("--seed-start", type=int, default=0, help="First seed.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, help="Samples per shard (one batch).")
@_guider_option(GUIDERS)
@_weight_option()
@click.option("--interval", default=None, help="Guide only for sigma in (lo, hi], given as lo-hi (e.g. 1e-3-5).")
@click.option("--png", is_flag=True, help="Image models: also one PNG per sample, OUT/png/<seed:09d>.png.")
@_nonfinite_option
@click.option(
    "--preset",
    default=None,
    help="An EDM2 preset (docs/EDM2.md; its networks, guider, weight, interval) "
    "from --models DIR; options given here override it.",
)
@click.option(
    "--models", type=click.Path(file_okay=False), default=None, help="--preset: the folder of its .pkl / .safetensors files."
)
@click.option(
    "--vae",
    type=click.Path(file_okay=False),
    default=None,
    help="Latent models (EDM2 img512): decode the samples through this local diffusers AutoencoderKL folder "
    "into OUT/png/<seed>.png.",
)
@_sample_options
@_threads_option
@_device_option()
@_quiet_option
def sample_cmd(
    out,
    n,
    seed_start,
    shard_size,
    guider,
    w,
    interval,
    png,
    allow_nonfinite,
    preset,
    models,
    vae,
    world,
    model,
    threads,
    device,
    quiet,
    **kw,
) -> None:
    """Sample into OUT/shard-*.npz with per-sample seeds; resumable; splits shards over torchrun ranks
    (torchrun --nproc-per-node N -m guidelab.app.cli sample ...; shard i goes to rank i % N)."""
    from . import jobs

    interval = _interval(interval)
    if preset is not None:
        from .edm2 import preset_settings

        ctx = click.get_current_context()
        explicit = {
            k
            for k in ("guider", "w", "interval", "guide", "label")
            if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
        }
        set_ = preset_settings(preset, models, dict(model=model, guider=guider, w=w, interval=interval, **kw), explicit)
        model, guider, w, interval = set_.pop("model"), set_.pop("guider"), set_.pop("w"), set_.pop("interval")
        kw.update(set_)
    cfg = _config(world, model, guider=guider, w=w, interval=interval, **kw)
    from .. import samplers

    _setup(quiet or int(os.environ.get("RANK", "0")) != 0, threads, 0 if model is None else _parameters(model))
    with samplers.allow_nonfinite(allow_nonfinite):
        _phase(f"loading {model or 'the exact world ' + (world or 'A')}")
        paths = jobs.sample(
            out, cfg, n=n, seed_start=seed_start, shard_size=shard_size, progress=not quiet, png=png and not vae, device=device
        )
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {len(paths)} shards ({n} samples) to {out}")
        if vae is not None:
            from .edm2 import decode_pngs

            click.echo(f"decoded {decode_pngs(out, vae)} images to {out}/png")


def _floats(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
        check(bool(out) and all(math.isfinite(v) for v in out), f"expected finite comma-separated numbers, got {text!r}")
        return out
    except ValueError:
        raise GuidelabError(f"expected comma-separated numbers, got {text!r}") from None


def _weights(text: str) -> list:
    """``--weights``: comma-separated numbers and schedules (a schedule's own ``key=value`` options after
    its ``:`` stay with it: ``2,steps:2-1:start=17,stop=22`` is two weights)."""
    from ..guidance import parse_weight

    parts: list[str] = []
    for piece in text.split(","):
        if parts and "=" in piece and ":" not in piece and ":" in parts[-1]:
            parts[-1] += "," + piece
        elif piece.strip():
            parts.append(piece.strip())
    check(bool(parts), f"--weights expected comma-separated numbers or schedules, got {text!r}")
    out: list = []
    for p in parts:
        try:
            w = parse_weight(p)
        except GuidelabError:
            raise GuidelabError(
                f"--weights expected comma-separated numbers or schedules (e.g. 2,linear:1-4), got {p!r} in {text!r}"
            ) from None
        check(not isinstance(w, float) or math.isfinite(w), f"--weights expected finite comma-separated numbers, got {text!r}")
        out.append(w if isinstance(w, float) else p)
    return out


def _sweep_guides(values, methods) -> tuple[str | None, dict]:
    """``--guide`` of a sweep: (the bare PATH for every method, {method: PATH})."""
    base, per = None, {}
    for v in values:
        head, eq, tail = v.partition("=")
        if eq and head.strip() in GUIDERS:
            check(head.strip() in methods, f"--guide {v}: {head.strip()} is not one of --methods {','.join(methods)}")
            check(head.strip() not in per, f"--guide {head.strip()}=... given twice")
            per[head.strip()] = tail
        else:
            check(base is None, f"--guide given twice without a method ({base}, {v}); name it: --guide METHOD=PATH")
            base = v
    return base, per


@main.command("sweep")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--methods", default="none,cfg", help=f"Comma-separated guiders: {', '.join(GUIDERS)}.")
@click.option(
    "--weights",
    default="1,1.5,2,3",
    help="Comma-separated guidance weights; schedules too (--weights 2,linear:1-4,steps:2-1:start=17,stop=22).",
)
@click.option("--intervals", default="", help="Guidance intervals lo-hi, comma-separated (e.g. 0.3-5); empty: always.")
@click.option("--samples", "n", type=click.IntRange(min=16), default=2048, help="Samples per cell.")
@click.option("--seed-start", type=int, default=0, help="First seed (every cell samples the same seeds).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, help="Samples per shard (one batch).")
@click.option("--metric", default="fd", help="Metric choosing the best weight per method.")
@click.option("--quality", default="precision", help="Quality axis of the Pareto front.")
@click.option("--diversity", default="recall", help="Diversity axis of the Pareto front.")
@click.option("--uncond", type=click.Path(), default=None, help="Deprecated: use --guide cfg=PATH (cfg's unconditional model).")
@click.option(
    "--noise-classifier",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="classifier: noise-aware classifier checkpoint (default: the packaged noise-aware digits one).",
)
@click.option(
    "--classifier",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Digits models: the clean digits classifier of the metrics (default: the packaged one, sha256 pinned).",
)
@click.option(
    "--reference",
    type=click.Path(dir_okay=False),
    default=None,
    help="Reference samples (.npz with 'samples'); default: exact samples (world), the digits test "
    "split in digits-classifier features (1x8x8 image models).",
)
@(lambda f: _sample_options(f, sweep=True))
@_threads_option
@_device_option()
@_nonfinite_option
@_quiet_option
def sweep_cmd(
    out,
    methods,
    weights,
    intervals,
    n,
    seed_start,
    shard_size,
    metric,
    quality,
    diversity,
    uncond,
    noise_classifier,
    classifier,
    reference,
    world,
    model,
    guide,
    threads,
    device,
    allow_nonfinite,
    quiet,
    **kw,
) -> None:
    """Methods x weights (x intervals) -> OUT/results.csv and .json, best weight per method, Pareto front."""
    import torch

    from .. import samplers
    from . import sweep

    ivs = [_interval(s, "--intervals") for s in intervals.split(",") if s.strip()] or [None]
    ref = torch.from_numpy(_npz_samples(reference)) if reference else None
    names = [m.strip() for m in methods.split(",") if m.strip()]
    base_guide, guides = _sweep_guides(guide, names)
    if uncond is not None:
        from ..log import get_logger

        _setup(quiet, 1)  # the warning below must show; threads are set again after
        get_logger("guidelab.cli").warning("warning: --uncond is deprecated; use --guide cfg=%s", uncond)
        check("cfg" not in guides, "--uncond and --guide cfg=... both give cfg's unconditional model; keep --guide cfg=...")
        guides["cfg"] = uncond
    base = _config(world, model, guide=base_guide, **{**kw, "options": ()})
    for m, p in guides.items():
        check(Path(p).exists(), f"checkpoint not found: {p} (--guide {m}=...)")
    _setup(quiet, threads, 0 if model is None else _parameters(model))
    settings = sweep.SweepConfig(
        {m: _weights(weights) for m in names},
        n=n,
        seed_start=seed_start,
        shard_size=shard_size,
        intervals=ivs,
        metric=metric,
        quality=quality,
        diversity=diversity,
        guides={**guides, **({"classifier": noise_classifier} if noise_classifier is not None else {})},
        options=kw["options"],
        classifier=classifier,
    )
    with samplers.allow_nonfinite(allow_nonfinite):
        res = sweep.run(out, base, settings, reference=ref, device=device, progress=not quiet)
    for r in res["rows"]:
        click.echo(
            f"{r['cell']:>24} weight={r.get('weight', r['w'])} {metric}={r[metric]:.4g} "
            f"{quality}={r[quality]:.3f} {diversity}={r[diversity]:.3f}"
            + (f" class_accuracy={r['class_accuracy']:.3f}" if r.get("class_accuracy") is not None else "")
        )
    click.echo(f"best by {metric}: {res['best']}")
    click.echo(f"Pareto front ({quality} vs {diversity}): {res['pareto']}")
    click.echo(f"wrote {out / 'results.csv'} and {out / 'results.json'}")


@main.command("report")
@click.argument("sweep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: SWEEP_DIR/report.html.")
def report_cmd(sweep_dir: Path, out) -> None:
    """Static HTML report of a sweep (trade-off plots, sample grids, table); opens from disk."""
    from . import report

    click.echo(f"wrote {report.render(sweep_dir, out)}")


@main.command("evaluate")
@click.argument("model", type=click.Path())
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder: metrics.json, grid.png, samples/ (resumable shards).",
)
@_guider_option(GUIDERS)
@_weight_option()
@click.option("--interval", default=None, help="Guide only for sigma in (lo, hi], given as lo-hi (e.g. 1e-3-5).")
@click.option("--samples", "n", type=click.IntRange(min=10), default=1000, help="Number of samples (seeds seed-start ...).")
@click.option("--seed-start", type=int, default=0, help="First seed.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=256,
    help="Samples per shard (one batch; a multiple of 64 wastes nothing).",
)
@click.option(
    "--classifier",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Clean digits classifier of the metrics (default: the one packaged with guidelab, sha256 pinned).",
)
@_threads_option
@_device_option(what="Sampling device")
@_how_options
@_nonfinite_option
@_quiet_option
def evaluate_cmd(
    model, out, guider, w, interval, n, seed_start, shard_size, classifier, threads, device, allow_nonfinite, quiet, **kw
) -> None:
    """One row of the digits table: sample MODEL (checkpoint or run folder; class-conditional: balanced
    labels, seed % 10), measure against the digits test split, write OUT/metrics.json and OUT/grid.png.

    Metrics (digits-classifier features): class accuracy, Fréchet distance, precision / recall (k = 3),
    density / coverage (k = 5); NFE per sample counted; wall time. Options: --guider and --weight (w = 1:
    none), --guide (autoguidance: checkpoint or run folder with --guide-step / --guide-sigma-rel; cfg: an
    unconditional checkpoint; classifier: a noise-aware classifier), --interval lo-hi, --label (default
    balanced), --unconditional, --sampler / --steps / --sigma-min / --sigma-max, --sigma-rel / --step (run
    folder), --option KEY=VALUE (guider keywords, e.g. tsg s=2), --samples / --seed-start / --shard-size,
    --classifier (metrics), --threads, --device. Example:

    \b
        guidelab evaluate runs/digits/RUN --guider autoguidance --guide runs/digits/RUN \\
            --guide-step 2048 --guide-sigma-rel 0.05 --weight 2 --out runs/eval/ag2
    """
    from .. import samplers
    from . import evaluate as ev

    cfg = _config(None, model, guider=guider, w=w, interval=_interval(interval), **kw)
    _setup(quiet, threads, _parameters(model))
    with samplers.allow_nonfinite(allow_nonfinite):
        r = ev.evaluate(
            out, cfg, n=n, seed_start=seed_start, shard_size=shard_size, classifier=classifier, device=device, progress=not quiet
        )
    acc = "n/a" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f}"
    click.echo(
        f"FD {r['fd']:.2f}  class accuracy {acc}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
        f"density {r['density']:.3f}  coverage {r['coverage']:.3f}  NFE {r['nfe']:g}  "
        f"sampling {r['sampling_seconds']:.0f} s"
    )
    click.echo(f"wrote {out / 'metrics.json'} and {out / 'grid.png'}")


def _read_config(path: Path | None, sets: tuple[str, ...], flag: str = "--set") -> dict:
    """A JSON or TOML config file (optional) with ``KEY=VALUE`` overrides (VALUE parsed as JSON, else a string)."""
    import json

    cfg: dict = {}
    if path is not None:
        try:
            text = path.read_text()
            if path.suffix.lower() == ".toml":
                try:
                    import tomllib
                except ImportError:  # Python 3.10
                    raise GuidelabError("TOML configs need Python >= 3.11; use a JSON config") from None
                cfg = tomllib.loads(text)
            else:
                cfg = json.loads(text)
        except (OSError, ValueError) as e:
            raise GuidelabError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(cfg, dict):
            raise GuidelabError(f"config {path} must hold a table / object of keys, got {type(cfg).__name__}")
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise GuidelabError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            cfg[key.strip()] = json.loads(value)
        except ValueError:
            cfg[key.strip()] = value
    return cfg


@main.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="JSON or TOML file of ImageConfig keys (guidelab.training.images).",
)
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable); VALUE is JSON or a string."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/images"),
    help="Parent folder; the run lives in OUT/<name-hash> (resumed if it exists).",
)
@_threads_option
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=256, help="Training state every this many steps.")
@click.option("--grid/--no-grid", default=True, help="Write a sample grid (grid.png) of the final EMA at the end.")
@click.option("--grid-w", type=click.FloatRange(min=1), default=1.0, help="recipe=gft: guidance weight of the grid (beta = 1/w).")
@_device_option("cpu", "Training device")
@_quiet_option
def train_cmd(config_path, sets, out, threads, checkpoint_every, grid, grid_w, device, quiet) -> None:
    """Train an image denoiser (EDM loss; digits or an image folder); resumes an interrupted run.

    Each model family has its own defaults (FAMILY_DEFAULTS: --set model=UNet is a small U-Net, not the
    MLP's width); an image folder's channels (grey or RGB) come from its images."""
    from ..training import load_model
    from ..training.images import ImageConfig, sample_grid, train_images
    from . import provenance

    cfg = ImageConfig.from_dict(_image_config(_read_config(config_path, sets)))
    _setup(quiet, threads, _train_parameters(cfg))
    _release()
    final = train_images(out, cfg, progress=not quiet, checkpoint_every=checkpoint_every, threads=threads, device=device)
    click.echo(f"final EMA snapshot: {final}")
    click.echo(f"loss curve: {final.parent / 'loss.png'}")
    if grid:
        path = sample_grid(load_model(final), final.parent / "grid.png", w=grid_w)
        provenance.stamp_png(path, provenance.collect(device=device, **provenance.files(model=final), config=asdict_json(cfg)))
        click.echo(f"samples: {path}")


#: Per model family, the defaults of the size keys (``--set model=UNet`` gets a U-Net-sized network, not
#: the MLP's ``hidden=512``); keys given in the config or with --set win.
FAMILY_DEFAULTS = {
    "PixelMLP": {"hidden": 512, "depth": 4, "emb": 128},
    "UNet": {"hidden": 32, "depth": 2, "emb": 128},
    "EDM2": {"hidden": 32, "depth": 2, "emb": 128},
}


def asdict_json(cfg) -> str:
    import dataclasses
    import json

    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def _image_config(d: dict) -> dict:
    """The train config with its family's size defaults (:data:`FAMILY_DEFAULTS`) and, for an image
    folder, ``channels`` read from the images (an explicit ``channels`` that disagrees is an error)."""
    d = dict(d)
    model = d.get("model", "PixelMLP")
    if isinstance(model, str) and model in FAMILY_DEFAULTS:
        d = {**FAMILY_DEFAULTS[model], **d}
    data = d.get("data", "digits")
    if isinstance(data, str) and data != "digits" and Path(data).is_dir():
        from ..data.folder import folder_channels

        found = folder_channels(Path(data))
        if found is not None:
            if "channels" in d:
                check(
                    d["channels"] == found,
                    f"--set channels={d['channels']} but the images in {data} are "
                    f"{'RGB (3)' if found == 3 else 'greyscale (1)'}; "
                    f"drop channels (it is read from the images) or set channels={found}",
                )
            d["channels"] = found
    return d


def _train_parameters(cfg) -> int | None:
    """Parameters of the network ``cfg`` trains, built on the meta device (no memory); None if unknown."""
    import torch

    from ..models import registry as models
    from ..training.images import model_config

    try:
        res = cfg.resolution or 8
        labels = torch.zeros(1, dtype=torch.long) if cfg.conditional else None

        class _Data:
            images = torch.zeros(1, cfg.channels if cfg.data != "digits" else 1, res, res)
            num_classes = 10

        _Data.labels = labels  # type: ignore[attr-defined]
        with torch.device("meta"):
            net = models.build(model_config(cfg, _Data))
        return sum(p.numel() for p in net.parameters())
    except Exception:
        return None


@main.command("classifier")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output .safetensors (default: the cache path the metrics use, see guidelab.app.digits_cache.default_path).",
)
@click.option("--noise-aware", is_flag=True, help="A noise-aware classifier p(y | x; sigma) for classifier guidance.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Adam steps on the digits train split.")
@click.option("--seed", type=int, default=0, help="Seed of the initial weights and the batches.")
@_threads_option
@_quiet_option
def classifier_cmd(out, noise_aware, steps, seed, threads, quiet) -> None:
    """Train the digits classifier (metric features, class accuracy) or its noise-aware twin (classifier guidance)."""
    import torch

    from ..data import digits
    from .digits_cache import default_path, digits_classifier

    _setup(quiet, threads, parameters=0)
    out = out if out is not None else default_path(noise_aware=noise_aware, steps=steps, seed=seed)
    check(not out.exists(), f"{out} exists; remove it or choose another --out")
    clf = digits_classifier(out, noise_aware=noise_aware, steps=steps, seed=seed, progress=not quiet)
    test = digits("test")
    with torch.no_grad():
        sigma = torch.full((len(test.labels),), 0.002) if noise_aware else None
        acc = (clf(test.images, sigma).argmax(1) == test.labels).float().mean().item()
    click.echo(f"{out}: test-split accuracy {acc:.3f}")


@main.command("convert-edm2")
@click.argument("pkl", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .safetensors checkpoint to write."
)
@click.option("--key", default="ema", help="The pickle's entry holding the network.")
def convert_edm2_cmd(pkl, out, key) -> None:
    """Convert an NVlabs EDM2 network pickle (read without running any code from it) to safetensors."""
    from .edm2 import convert

    click.echo(f"wrote {convert(pkl, out, key)}")


@main.command("phema")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--sigma-rel", type=float, required=True, help="Relative EMA length to reconstruct, in (0, 0.2887).")
@click.option("--step", type=click.IntRange(min=1), default=None, help="Training step (default: the last snapshot).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .safetensors checkpoint.")
def phema_cmd(run_dir, sigma_rel, step, out) -> None:
    """Post-hoc EMA: rebuild the EMA of any sigma_rel from a run's snapshots (EDM2) as a checkpoint."""
    from ..training import save_model
    from ..training.phema import reconstruct
    from .jobs.assembly import warn_phema

    _setup(False, None, parameters=0)
    m = reconstruct(run_dir, sigma_rel, step)
    info = {k: v for k, v in m.checkpoint_info.items() if k != "model"}
    warn_phema(m, f"{run_dir} at sigma_rel {sigma_rel:g}")
    save_model(out, m, **info)
    click.echo(f"wrote {out} (profile error {info['phema_error']:.2g})")


@main.command("distill")
@click.argument("teacher", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder (stage 1; resumed if it exists) or, with --progressive, the parent of OUT/steps-<K>.",
)
@click.option(
    "--guider",
    type=_Guider(list(DISTILL_GUIDERS)),
    default="cfg",
    help=f"Stage 1: the guider to distil: {registry.summaries(DISTILL_GUIDERS)}.",
)
@click.option(
    "--guide",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="autoguidance: the weaker model; cfg: an unconditional model (checkpoint or run folder).",
)
@click.option("--w-min", type=float, default=1.0, help="Stage 1: smallest guidance weight (1 = no guidance).")
@click.option("--w-max", type=float, default=5.0, help="Stage 1: largest guidance weight.")
@click.option("--progressive", is_flag=True, help="Stage 2: halve the Euler steps of a distilled TEACHER round by round.")
@click.option(
    "--from-steps",
    type=click.IntRange(min=2),
    default=None,
    help="--progressive from a stage-1 student: its Euler steps on karras(N, sigma-min, sigma-max, rho).",
)
@click.option("--to-steps", type=click.IntRange(min=1), default=None, help="--progressive: the final step count.")
@click.option("--sigma-min", type=float, default=0.002, help="--progressive: the Karras grid's smallest sigma.")
@click.option("--sigma-max", type=float, default=80.0, help="--progressive: the Karras grid's largest sigma.")
@click.option("--rho", type=float, default=7.0, help="--progressive: the Karras grid's rho.")
@click.option("--sigma-rel", type=float, default=0.10, help="A run folder as TEACHER: the post-hoc EMA length used.")
@click.option("--step", type=click.IntRange(min=1), default=None, help="A run folder as TEACHER: the step (default last).")
@click.option("--guide-sigma-rel", type=float, default=0.10, help="A run folder as --guide: its post-hoc EMA length.")
@click.option("--guide-step", type=click.IntRange(min=1), default=None, help="A run folder as --guide: the step.")
@click.option("--init", type=click.Choice(["teacher", "scratch"]), default="teacher", help="Stage 1: student's initial weights.")
@click.option("--iters", type=click.IntRange(min=1), default=2048, help="Adam steps (per round with --progressive).")
@click.option("--batch", type=click.IntRange(min=1), default=256, help="Training batch size.")
@click.option("--lr", type=float, default=5e-4, help="Adam learning rate (before the 1/sqrt decay).")
@click.option("--lr-ref-steps", type=click.IntRange(min=1), default=1024, help="Learning rate decays as 1/sqrt(step / this).")
@click.option("--ema", default="0.05,0.1", help="Power-function EMA sigma_rel profiles (comma-separated).")
@click.option("--snapshot-every", type=click.IntRange(min=1), default=512, help="Post-hoc EMA snapshots every this many steps.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the training batches and noise.")
@_threads_option
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=256, help="Training state every this many steps.")
@_device_option("cpu", "Training device")
@_quiet_option
def distill_cmd(
    teacher,
    out,
    guider,
    guide,
    w_min,
    w_max,
    progressive,
    from_steps,
    to_steps,
    sigma_min,
    sigma_max,
    rho,
    sigma_rel,
    step,
    guide_sigma_rel,
    guide_step,
    init,
    iters,
    batch,
    lr,
    lr_ref_steps,
    ema,
    snapshot_every,
    seed,
    threads,
    checkpoint_every,
    device,
    quiet,
) -> None:
    """Guidance distillation (Meng et al. 2023): stage 1 (a w-conditioned student of CFG / autoguidance)
    or, with --progressive, stage 2 (halving the Euler steps); resumes an interrupted run."""
    from ..training import LoopConfig, load_model
    from ..training import distill as ds

    for flag, name, path in (("--sigma-rel", "sigma_rel", teacher), ("--guide-sigma-rel", "guide_sigma_rel", guide)):
        check(
            not _given(name) or (path is not None and Path(path).is_dir()),
            f"{flag} picks the post-hoc EMA of a training run folder; {path or '(no --guide)'} is not one: drop {flag}",
        )
    _setup(quiet, threads, _parameters(teacher))
    _release()
    loop = LoopConfig(
        iters=iters,
        batch=batch,
        lr=lr,
        lr_ref_steps=lr_ref_steps,
        ema=tuple(_floats(ema)),
        snapshot_every=snapshot_every,
        seed=seed,
    )
    rt = ds.Runtime(progress=not quiet, checkpoint_every=checkpoint_every, device=device, threads=threads)
    teacher_ref = ds.NetworkRef(teacher, sigma_rel, step)
    if progressive:
        check(to_steps is not None, "--progressive needs --to-steps")
        for path in ds.progressive_images(
            out,
            teacher_ref,
            to_steps=to_steps,
            from_steps=from_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            loop=loop,
            runtime=rt,
        ):
            click.echo(f"student ({len(ds.distilled_info(load_model(path))['sigmas']) - 1} Euler steps): {path}")
        return
    check(to_steps is None and from_steps is None, "--from-steps / --to-steps need --progressive")
    final = ds.distill_images(
        out,
        teacher_ref,
        guider=guider,
        guide=guide and ds.NetworkRef(guide, guide_sigma_rel, guide_step),
        cfg=ds.DistillConfig(w_min=w_min, w_max=w_max),
        init=init,
        loop=loop,
        runtime=rt,
    )
    click.echo(f"student (w in [{w_min:g}, {w_max:g}], input 'w'): {final}")


#: --dtype spellings: the short names generate's pipelines use and the torch names of the other commands.
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _need_diffusers(what: str) -> None:
    import importlib.util

    check(
        importlib.util.find_spec("diffusers") is not None,
        f"{what} needs the diffusers package, which is not installed: pip install diffusers transformers",
    )


def _check_diffusers_label(model_dir: Path, label, null_label) -> None:
    """--label / --null-label within the classes a diffusers folder's config declares (DiT: num_embeds_ada_norm,
    UNet2DModel: num_class_embeds; the null label may be the extra class num_classes)."""
    import json

    n = None
    for cfg in (model_dir / "config.json", model_dir / "transformer" / "config.json", model_dir / "unet" / "config.json"):
        try:
            d = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            n = d.get("num_embeds_ada_norm") or d.get("num_class_embeds")
            break
    if not isinstance(n, int) or n <= 0:
        return
    if label is not None:
        check(0 <= label < n, f"--label {label} out of range: {model_dir} has {n} classes (0 .. {n - 1})")
    if null_label is not None:
        check(0 <= null_label <= n, f"--null-label {null_label} out of range: {model_dir} has {n} classes (null: 0 .. {n})")


@main.command("diffusers")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for PNGs + samples.npz.")
@_guider_option(DIFFUSERS_GUIDERS)
@_weight_option()
@click.option("--guide", type=click.Path(path_type=Path), default=None, help="Guide model folder (autoguidance).")
@click.option("--sampler", default="euler", help="Sampler name (guidelab samplers).")
@click.option("--steps", type=click.IntRange(min=1), default=32, help="Sampler steps.")
@click.option(
    "--schedule",
    type=click.Choice(["karras", "leading", "trailing", "linspace", "pipeline"]),
    default="karras",
    help="karras between the model's sigma ends, its timesteps with diffusers' spacing, or "
    "pipeline (the folder's scheduler: grid, start, x0 clipping, last step).",
)
@click.option(
    "--timesteps",
    type=click.Choice(["interpolate", "nearest"]),
    default="interpolate",
    help="sigma -> timestep: fractional t (log-sigma interpolation) or the nearest grid t.",
)
@click.option("--seeds", default="0-7", help="Seeds: a range 0-7 or a list 1,2,5.")
@click.option("--batch", type=click.IntRange(min=1), default=16, help="Samples per network call (does not change them).")
@click.option(
    "--block",
    type=click.IntRange(min=0),
    default=64,
    help="Fixed blocks of seeds (seed s in row s % BLOCK): samples bit-identical at any --batch; 0: off.",
)
@click.option("--label", type=int, default=None, help="Class label for class-conditional models.")
@click.option("--null-label", type=int, default=None, help="The null label cfg uses (DiT: its num_classes by default).")
@click.option(
    "--prompt-embeds",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="safetensors with 'prompt_embeds' [1 or N, L, dim], optionally 'null_embeds' [1, L, dim] and "
    "attention masks 'prompt_attention_mask' / 'null_attention_mask' [1 or N, L] (text models).",
)
@click.option(
    "--layers",
    default=None,
    help="pag/seg/slg/sag/nag/tsg: comma-separated substrings of layer names or 'all' "
    "(default: diffusers' recommended layers; tsg: every time embedder).",
)
@click.option(
    "--cfg-weight",
    type=float,
    default=None,
    help="pag/seg/slg/sag/nag: CFG at this weight as well, in the same batched call: "
    "D = D_u + CFG_WEIGHT (D_c - D_u) + (WEIGHT - 1)(D_c - D_pert).",
)
@click.option(
    "--interval",
    default=None,
    help="Guide only for sigma in (lo, hi], given as lo-hi (e.g. 1e-3-5); "
    "slg default: diffusers' step window (0.01 n < step < 0.2 n).",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help=f"Guider keyword (repeatable): {_option_help(DIFFUSERS_GUIDERS)}.",
)
@_device_option("cpu")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64", "float16", "bfloat16", "fp32", "fp16", "bf16"]),
    default="float32",
    callback=lambda ctx, p, v: _DTYPE_NAMES.get(v, v),
    help="Model precision (float16 / bfloat16, or fp16 / bf16: the sampler still runs in float32).",
)
@_threads_option
@_nonfinite_option
@_allow_bin_option
@_quiet_option
def diffusers_cmd(
    model_dir,
    out,
    guider,
    w,
    guide,
    seeds,
    interval,
    prompt_embeds,
    layers,
    dtype,
    options,
    threads,
    allow_nonfinite,
    allow_bin,
    quiet,
    **kw,
) -> None:
    """Sample a local diffusers model (UNet2DModel, UNet2DConditionModel, DiT, PixArt) with any sampler and guider."""
    from .. import samplers

    _need_diffusers("guidelab diffusers")
    emb = {}
    if prompt_embeds is not None:
        from safetensors.torch import load_file

        try:
            emb = load_file(prompt_embeds)
        except Exception as e:  # not a safetensors file
            raise GuidelabError(f"--prompt-embeds {prompt_embeds} is not a safetensors file: {str(e).splitlines()[0]}") from None
    try:
        if "-" in seeds:
            first, last = (int(v) for v in seeds.split("-"))
            seed_list = list(range(first, last + 1))
        else:
            seed_list = [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        raise GuidelabError(f"--seeds must look like 0-7 or 1,2,5, got {seeds!r}") from None
    _check_diffusers_label(Path(model_dir), kw.get("label"), kw.get("null_label"))
    from .diffusers_generate import generate

    kw["allow_pickle"] = allow_bin
    _setup(quiet, threads, _parameters(model_dir))
    _phase(f"loading {model_dir}")
    kw["progress"] = not quiet
    with samplers.allow_nonfinite(allow_nonfinite):
        generate(
            model_dir,
            out=out,
            guider=guider,
            w=_parsed(w),
            guide=guide,
            seeds=seed_list,
            interval=_interval(interval),
            prompt_embeds=emb.get("prompt_embeds"),
            null_text=emb.get("null_embeds"),
            prompt_mask=emb.get("prompt_attention_mask"),
            null_mask=emb.get("null_attention_mask"),
            layers=layers.split(",") if layers else None,
            dtype=dtype,
            guider_options=list(options),
            **kw,
        )
    click.echo(f"wrote {len(seed_list)} samples to {out}")


@main.command(
    "generate",
    epilog="""\b
Examples (one per pipeline family; FOLDER is a local diffusers folder, nothing is downloaded):
  guidelab generate sd15 --prompt "a red cube" --guider cfg --weight 7.5 --out runs/sd
  guidelab generate sdxl --prompt "a red cube" --guider pag --weight 4 --option cfg_weight=5 --out runs/sdxl --device cuda --dtype fp16
  guidelab generate pixart-sigma --prompt "a red cube" --guider cfg --weight 4.5 --out runs/pixart --device cuda --dtype bf16
  guidelab generate sd3 --prompt "a red cube" --guider cfg_zero_star --weight 4 --out runs/sd3
  guidelab generate flux-dev --prompt "a red cube" --guider none --guidance 3.5 --steps 28 --out runs/flux --device cuda --dtype bf16
""",  # noqa: E501 (one command per line, as typed)
)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="The prompt (repeat: one per seed).")
@click.option("--negative-prompt", default=None, help="The reference branch of cfg and its relatives.")
@click.option("--guider", default="cfg", help="A guider of the registry (guidelab guiders).")
@click.option("--weight", "w", type=float, default=7.5, help="Guidance weight (1 = no guidance).")
@click.option(
    "--guide",
    type=click.Path(path_type=Path),
    default=None,
    help="autoguidance: the weaker pipeline folder (same text encoders and VAE).",
)
@click.option("--sampler", default=None, help="Default: the sampler equal to the folder's scheduler (DDIM -> ddim).")
@click.option("--steps", type=click.IntRange(min=1), default=20, help="Sampler steps.")
@click.option("--schedule", default="pipeline", help="pipeline (the folder's scheduler grid), karras, leading, ...")
@click.option("--seeds", default="0", help="Seeds: a range 0-7 or a list 1,2,5.")
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="FLUX's embedded guidance (diffusers' guidance_scale) of guidance-distilled models; default: the pipeline's 3.5.",
)
@click.option("--height", type=click.IntRange(min=8), default=None, help="Image height in pixels; default: the pipeline's.")
@click.option("--width", type=click.IntRange(min=8), default=None, help="Image width in pixels; default: the pipeline's.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="PNGs + grid.png.")
@_device_option("cpu")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]),
    default="fp32",
    callback=lambda ctx, p, v: {b: a for a, b in _DTYPE_NAMES.items()}.get(v, v),
    help="Pipeline precision (float32 / float16 / bfloat16, or fp32 / fp16 / bf16).",
)
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Guider keyword (repeatable).")
@_threads_option
@_nonfinite_option
@_allow_bin_option
@_quiet_option
def generate_cmd(folder, prompts, seeds, options, out, threads, allow_nonfinite, allow_bin, quiet, **kw) -> None:
    """Prompt in, image out: a local SD 1.x/2.x, SDXL, PixArt, SD3 or FLUX pipeline folder guided by any guider
    (docs/PIPELINES.md)."""
    from .. import samplers

    _need_diffusers("guidelab generate")
    from . import diffusers_generate as dg
    from . import provenance

    seed_list = dg.parse_seeds(seeds)
    for text in options:  # the pipeline's own inputs are options of the command, not of a guider
        key, _, value = text.partition("=")
        check(
            key.strip() not in ("guidance", "height", "width"),
            f"--option {text}: {key.strip()} is an input of the pipeline, not a guider option; give --{key.strip()} {value}",
        )
    opts = dict(registry.parse_options(kw["guider"], list(options)))
    _setup(quiet, threads, _parameters(folder))
    _phase(f"loading the pipeline {folder}")
    with samplers.allow_nonfinite(allow_nonfinite):
        dg.generate_images(folder, prompts, out=out, seeds=seed_list, progress=not quiet, allow_pickle=allow_bin, **kw, **opts)
    grid = Path(out) / "grid.png"
    if grid.exists():
        provenance.stamp_png(
            grid,
            provenance.collect(
                device=kw.get("device", "cpu"),
                **provenance.files(model=folder, guide=kw.get("guide")),
                prompts=json.dumps(list(prompts)),
                seeds=provenance.seeds_text(seed_list),
                **{k: v for k, v in kw.items() if k not in ("device", "guide") and v is not None},
                guider_options=json.dumps(opts) if opts else None,
            ),
        )
    click.echo(f"wrote {len(seed_list)} images and grid.png to {out}")


@main.command("inverse")
@click.argument("model")
@click.option("--task", type=click.Choice(["inpaint", "superres", "lowpass", "colorize"]), required=True, help="The measurement.")
@click.option(
    "--method",
    type=click.Choice(["repaint", "ilvr", "dps", "steered", "tfg", "sdg", "score_sde"]),
    required=True,
    help="The conditioning method (guidelab.inverse).",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="The clean image (PNG/JPEG, or .npz/.npy [C, H, W] in [-1, 1]); the measurement is made from it.",
)
@click.option(
    "--out", type=click.Path(file_okay=False), required=True, help="Writes OUT/samples.npz, OUT/grid.png and OUT/run.json."
)
@click.option(
    "--mask", type=click.Choice(["centre", "left", "right", "random"]), default="centre", help="inpaint: the known region."
)
@click.option("--factor", type=click.IntRange(min=1), default=2, help="superres / lowpass: the downsampling factor N.")
@click.option("--n", type=click.IntRange(min=1), default=8, help="Samples (seeds SEED .. SEED + n - 1).")
@click.option("--seed", type=int, default=0, help="First seed (of the n samples and of a random mask).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Default: the paper's (guidelab.inverse.tasks.DEFAULTS).")
@click.option("--sigma-max", type=float, default=80.0, help="Largest sigma of the schedule.")
@click.option("--jump-length", type=click.IntRange(min=1), default=None, help="repaint (paper: 10).")
@click.option("--jump-n-sample", type=click.IntRange(min=1), default=None, help="repaint (paper: 10).")
@click.option("--zeta", type=float, default=None, help="dps step size (official code default 1.0).")
@click.option("--weight", "w", type=float, default=None, help="sdg weight w = 1 + s (default 2).")
@_threads_option
@_nonfinite_option
@_quiet_option
def inverse_cmd(
    model, task, method, input_path, out, mask, factor, n, seed, steps, sigma_max, threads, allow_nonfinite, quiet, **options
) -> None:
    """Condition an unconditional MODEL (checkpoint, run folder, or digits-gmm) on a measurement of --input."""
    from .. import samplers
    from . import provenance
    from .inverse import run_inverse

    keep = {"repaint": ("jump_length", "jump_n_sample"), "dps": ("zeta",), "sdg": ("w",)}.get(method, ())
    extra = [k for k, v in options.items() if v is not None and k not in keep]
    check(not extra, f"--{extra[0].replace('_', '-') if extra else ''} does not apply to --method {method}")
    _setup(quiet, threads, _parameters(model) if Path(model).exists() else 0)
    _phase(f"loading {model}")
    with samplers.allow_nonfinite(allow_nonfinite):
        path = run_inverse(
            model,
            task,
            method,
            input_path,
            out,
            n=n,
            seed=seed,
            mask=mask,
            factor=factor,
            steps=steps,
            sigma_max=sigma_max,
            progress=not quiet,
            **{k: v for k, v in options.items() if k in keep},
        )
    if (Path(path) / "grid.png").exists():
        provenance.stamp_png(
            Path(path) / "grid.png",
            provenance.collect(
                **provenance.files(model=model if Path(model).exists() else None, input=input_path),
                model_name=model,
                task=task,
                method=method,
                seeds=provenance.seeds_text(range(seed, seed + n)),
                steps=steps or "paper default",
                sigma_max=sigma_max,
                mask=mask if task == "inpaint" else None,
                factor=factor if task in ("superres", "lowpass") else None,
                **{k: v for k, v in options.items() if k in keep and v is not None},
            ),
        )
    nfe = json.loads((Path(path) / "run.json").read_text())["nfe"]
    click.echo(f"wrote {path}/samples.npz, {path}/grid.png and {path}/run.json ({nfe} NFE per sample)")


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    help="Output folder (models are cached in OUT/models).",
)
@click.option("--samples", "n", type=click.IntRange(min=16), default=4096, help="Samples per method and weight.")
@click.option("--seed", type=int, default=0, help="Seed of the initial points and the reference set.")
@click.option("--quick", is_flag=True, help="Tiny models, for a smoke test; too short to show the paper's finding.")
@click.option(
    "--fuse",
    is_flag=True,
    help="Train the main model with its exact score as one compiled kernel (torch.compile, needs a C++ compiler): "
    "~5 % faster; equal to float rounding, not bit for bit.",
)
@_threads_option
@_nonfinite_option
@_quiet_option
def demo(out: Path, n: int, seed: int, quick: bool, fuse: bool, threads, allow_nonfinite: bool, quiet: bool) -> None:
    """Autoguidance vs CFG on the exact 2-D tree: train, sample, measure, write OUT/report.html (CPU; small
    models, so one thread by default)."""
    from .. import fused, samplers
    from . import demo as demo_mod

    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    if fuse:
        fused.resolve(True)  # no compiler: one error line, before anything is written
    _setup(quiet, threads, parameters=demo_mod.PARAMETERS)
    with samplers.allow_nonfinite(allow_nonfinite):
        records = demo_mod.run(
            out, n=n, seed=seed, progress=not quiet, model_overrides=demo_mod.QUICK if quick else None, fuse=fuse
        )
    click.echo(f"{'method':>13} {'w':>4} {'mean_logp':>9} {'precision':>9} {'recall':>7}")
    for r in records:
        click.echo(f"{r.method:>13} {r.w:>4g} {r.mean_logp:>9.3f} {r.precision:>9.3f} {r.recall:>7.3f}")
    for claim, ok, evidence in demo_mod.check_finding(records):
        click.echo(f"[{'holds' if ok else 'DOES NOT HOLD'}] {claim}: {evidence}")
    click.echo(f"wrote {out / 'report.html'} and {out / 'metrics.json'}")


def _load_commands() -> None:
    """Import every module of :mod:`guidelab.app.commands` (each registers its command on :func:`main`)."""
    import importlib
    import pkgutil

    from . import commands

    for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{m.name}")


_load_commands()


def run() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        main(standalone_mode=True)
    except GuidelabError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
