"""Bad inputs at the command line (issue 14): one row per case -- the arguments, a fragment of the
expected message. Every row must end in one ``error:`` line (or click's usage error), exit code 2, no
traceback, and leave the file system as it found it (the row's --out never created; existing folders
unchanged). Rows run in-process (CliRunner) on the exact world or tiny random networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab.app import cli
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP
from guidelab.training import save_model

W = ["sample", "--samples", "4", "--shard-size", "4", "--steps", "2", "--quiet", "--out", "{out}"]
M = W + ["--model", "{d}/cond.safetensors"]
SW = ["sweep", "--out", "{out}", "--samples", "16", "--steps", "2", "--methods", "cfg", "--weights", "2"]
EV = ["evaluate", "{d}/cond.safetensors", "--out", "{out}", "--samples", "10", "--steps", "2", "--quiet"]
TR = ["train", "--out", "{out}", "--quiet", "--set", "iters=2"]
DI = ["distill", "{d}/cond.safetensors", "--out", "{out}", "--iters", "2", "--quiet"]
PH = ["phema", "{d}/norun", "--out", "{out}/g.safetensors"]

ROWS = [
    # --- sample: the exact world
    ("world-unknown", W + ["--world", "C"], "tree"),
    ("guider-unknown", W + ["--guider", "bogus"], "unknown guider"),
    ("guider-needs-model", W + ["--guider", "autoguidance", "--weight", "2"], "needs a model"),
    ("weight-nan", W + ["--guider", "cfg", "--weight", "nan"], "finite"),
    ("weight-inf", W + ["--guider", "cfg", "--weight", "inf"], "finite"),
    ("weight-text", W + ["--weight", "abc"], "abc"),
    ("steps-1", W + ["--steps", "1"], "steps"),
    ("steps-0", W + ["--steps", "0"], "steps"),
    ("steps-text", W + ["--steps", "x"], "steps"),
    ("steps-float", W + ["--steps", "2.5"], "steps"),
    ("samples-0", W + ["--samples", "0"], "samples"),
    ("samples-neg", W + ["--samples", "-3"], "samples"),
    ("shard-0", W + ["--shard-size", "0"], "shard-size"),
    ("seed-text", W + ["--seed-start", "abc"], "seed-start"),
    ("seed-float", W + ["--seed-start", "1.5"], "seed-start"),
    ("seed-neg", W + ["--seed-start", "-1"], "seeds"),
    ("seed-2^63", W + ["--seed-start", str(2**63)], "seeds"),
    ("seed-near-2^63", W + ["--seed-start", str(2**63 - 2)], "seeds"),
    ("seed-huge", W + ["--seed-start", "1" + "0" * 40], "seeds"),
    ("sigma-max-1e30", W + ["--sigma-max", "1e30"], "sigma_max"),
    ("sigma-max-inf", W + ["--sigma-max", "inf"], "sigma"),
    ("sigma-max-nan", W + ["--sigma-max", "nan"], "sigma"),
    ("sigma-max-neg", W + ["--sigma-max", "-1"], "sigma"),
    ("sigma-max-0", W + ["--sigma-max", "0"], "sigma"),
    ("sigma-min-0", W + ["--sigma-min", "0"], "sigma"),
    ("sigma-min-neg", W + ["--sigma-min", "-0.1"], "sigma"),
    ("sigma-min-nan", W + ["--sigma-min", "nan"], "sigma"),
    ("sigma-min-above-max", W + ["--sigma-min", "10", "--sigma-max", "5"], "sigma_min"),
    ("sigma-min-eq-max", W + ["--sigma-min", "5", "--sigma-max", "5"], "sigma_min"),
    ("dtype-bad", W + ["--dtype", "float16"], "dtype"),
    ("dtype-text", W + ["--dtype", "int8"], "dtype"),
    ("sampler-unknown", W + ["--sampler", "bogus"], "sampler"),
    ("interval-neg", W + ["--guider", "cfg", "--weight", "2", "--interval", "-1-2"], "interval"),
    ("interval-reversed", W + ["--guider", "cfg", "--weight", "2", "--interval", "5-1"], "interval"),
    ("interval-equal", W + ["--guider", "cfg", "--weight", "2", "--interval", "1-1"], "interval"),
    ("interval-text", W + ["--guider", "cfg", "--weight", "2", "--interval", "a-b"], "interval"),
    ("interval-one", W + ["--guider", "cfg", "--weight", "2", "--interval", "3"], "interval"),
    ("interval-three", W + ["--guider", "cfg", "--weight", "2", "--interval", "1-2-3"], "interval"),
    ("interval-no-guider", W + ["--interval", "0.3-5"], "interval"),
    ("label-text", W + ["--label", "cat"], "label"),
    ("label-neg", W + ["--label", "-1"], "label"),
    ("label-world", W + ["--label", "3"], "label"),
    ("label-float", W + ["--label", "1.5"], "label"),
    ("option-unknown", W + ["--guider", "cfg", "--weight", "2", "--option", "bogus=1"], "bogus"),
    ("option-no-eq", W + ["--guider", "cfg", "--weight", "2", "--option", "bogus"], "KEY=VALUE"),
    ("option-none-guider", W + ["--option", "s=1"], "option"),
    ("guide-world-cfg", W + ["--guider", "cfg", "--weight", "2", "--guide", "{d}/cond.safetensors"], "guide"),
    ("guide-world-none", W + ["--guide", "{d}/cond.safetensors"], "guide"),
    ("world-and-model", W + ["--world", "A", "--model", "{d}/cond.safetensors"], "exactly one"),
    ("unconditional-cfg", W + ["--guider", "cfg", "--weight", "2", "--unconditional"], "unconditional"),
    ("png-world", W + ["--png"], "png"),
    ("out-is-file", ["sample", "--samples", "4", "--steps", "2", "--quiet", "--out", "{d}/cond.safetensors"], "is a file"),
    ("out-unwritable", W[:-1] + ["/proc/guidelab-out"], "proc"),
    ("out-garbage-job", W[:-1] + ["{d}/garbage-job"], "job"),
    ("out-list-job", W[:-1] + ["{d}/list-job"], "job"),
    ("out-other-job", W[:-1] + ["{d}/other-job"], "another job"),
    ("sigma-rel-world", W + ["--sigma-rel", "nan"], "sigma"),
    ("step-0", W + ["--step", "0"], "step"),
    ("sampler-option-unknown", W + ["--guider", "cfg", "--weight", "2", "--option", "s_churn=1"], "s_churn"),
    ("sampler-option-bad-key", W + ["--sampler", "heun", "--sampler-option", "order=2"], "heun takes no option order"),
    ("sampler-option-no-value", W + ["--sampler-option", "s_churn"], "KEY=VALUE"),
    ("sampler-option-twice", W + ["--sampler-option", "s_churn=1", "--sampler-option", "s_churn=2"], "twice"),
    ("dpm-solver-v3-world", W + ["--sampler", "dpm_solver_v3"], "ems=PATH or ems=degenerate"),
    ("dpm-solver-v3-no-ems", M + ["--sampler", "dpm_solver_v3"], "guidelab ems"),
    ("dpm-solver-v3-ems-missing", M + ["--sampler", "dpm_solver_v3", "--sampler-option", "ems={d}/no.st"], "statistics"),
    ("evaluate-sampler-option", EV + ["--sampler", "euler", "--sampler-option", "eta=1"], "euler takes no option eta"),
    ("sweep-sampler-option", SW + ["--sampler-option", "bogus"], "KEY=VALUE"),
    # --- sample: checkpoints
    ("model-missing", W + ["--model", "{d}/missing.safetensors"], "not found"),
    ("model-garbage", W + ["--model", "{d}/garbage.safetensors"], "garbage"),
    ("model-empty", W + ["--model", "{d}/empty.safetensors"], "empty"),
    ("model-nan-weights", W + ["--model", "{d}/nan.safetensors"], "non-finite"),
    ("model-inf-weights", W + ["--model", "{d}/inf.safetensors"], "non-finite"),
    ("model-huge-config", W + ["--model", "{d}/huge.safetensors"], "does not match"),
    ("model-pickle", W + ["--model", "{d}/evil.pt"], "evil.pt"),
    ("model-json", W + ["--model", "{d}/list.json"], "list.json"),
    ("model-folder-empty", W + ["--model", "{d}/emptydir"], "emptydir"),
    ("model-label-range", M + ["--label", "10"], "out of range"),
    ("model-label-uncond", W + ["--model", "{d}/uncond.safetensors", "--label", "1"], "unconditional"),
    ("model-guide-missing", M + ["--guider", "autoguidance", "--weight", "2", "--guide", "{d}/missing.safetensors"], "not found"),
    ("model-guide-shape", M + ["--guider", "autoguidance", "--weight", "2", "--guide", "{d}/other-shape.safetensors"], "shape"),
    ("model-guide-garbage", M + ["--guider", "autoguidance", "--weight", "2", "--guide", "{d}/garbage.safetensors"], "garbage"),
    ("model-guide-nan", M + ["--guider", "autoguidance", "--weight", "2", "--guide", "{d}/nan.safetensors"], "non-finite"),
    ("model-autoguidance-no-guide", M + ["--guider", "autoguidance", "--weight", "2"], "guide"),
    (
        "model-classifier-denoiser",
        M + ["--guider", "classifier", "--weight", "2", "--label", "1", "--guide", "{d}/cond.safetensors"],
        "classifier",
    ),
    ("model-classifier-no-label", M + ["--guider", "classifier", "--weight", "2"], "label"),
    ("model-tsg-option-text", M + ["--guider", "tsg", "--weight", "2", "--option", "s=abc"], "abc"),
    ("model-tsg-option-bogus", M + ["--guider", "tsg", "--weight", "2", "--option", "bogus=1"], "bogus"),
    ("model-sigma-max-inf", M + ["--sigma-max", "inf"], "sigma"),
    ("model-sigma-max-1e30", M + ["--sigma-max", "1e30"], "sigma"),
    ("model-step-on-file", M + ["--step", "5"], "step"),
    ("model-png-toy", W + ["--model", "{d}/toy.safetensors", "--png"], "png"),
    ("preset-unknown", W + ["--preset", "bogus", "--models", "{d}/emptydir"], "preset"),
    ("preset-no-models", W + ["--preset", "edm2-img64-s-autog"], "models"),
    # --- sweep
    ("sweep-method-unknown", SW[:-4] + ["--methods", "bogus"], "bogus"),
    ("sweep-weights-empty", SW[:-2] + ["--weights", ""], "numbers"),
    ("sweep-weights-text", SW[:-2] + ["--weights", "1,x"], "numbers"),
    ("sweep-weights-nan", SW[:-2] + ["--weights", "nan"], "numbers"),
    ("sweep-intervals-bad", SW + ["--intervals", "5-1"], "interval"),
    ("sweep-intervals-text", SW + ["--intervals", "a"], "interval"),
    ("sweep-samples-small", SW[:4] + ["--samples", "4"] + SW[6:], "samples"),
    ("sweep-metric-unknown", SW + ["--metric", "bogus"], "metric"),
    ("sweep-quality-unknown", SW + ["--quality", "bogus"], "metric"),
    ("sweep-diversity-unknown", SW + ["--diversity", "bogus"], "metric"),
    ("sweep-reference-missing", SW + ["--reference", "{d}/missing.npz"], "missing.npz"),
    ("sweep-reference-no-samples", SW + ["--reference", "{d}/nosamples.npz"], "samples"),
    ("sweep-reference-object", SW + ["--reference", "{d}/object.npz"], "reference"),
    ("sweep-reference-garbage", SW + ["--reference", "{d}/garbage.safetensors"], "reference"),
    ("sweep-reference-shape", SW + ["--reference", "{d}/wrongshape.npz"], "shape"),
    ("sweep-steps-1", SW + ["--steps", "1"], "steps"),
    ("sweep-sigma-max-inf", SW + ["--sigma-max", "inf"], "sigma"),
    ("sweep-world-unknown", SW + ["--world", "Q"], "tree"),
    ("sweep-seed-2^63", SW + ["--seed-start", str(2**63)], "seeds"),
    ("sweep-model-missing", SW + ["--model", "{d}/missing.safetensors"], "not found"),
    ("sweep-model-nan", SW + ["--model", "{d}/nan.safetensors"], "non-finite"),
    ("sweep-option-bogus", SW + ["--option", "bogus=1"], "bogus"),
    ("sweep-guide-world", SW + ["--guide", "{d}/cond.safetensors"], "guide"),
    ("sweep-label-text", SW + ["--label", "x"], "label"),
    ("sweep-uncond-missing", SW + ["--uncond", "{d}/missing.safetensors"], "not found"),
    # --- report
    ("report-missing", ["report", "{d}/missing-dir"], "missing-dir"),
    ("report-no-results", ["report", "{d}/emptydir"], "results.json"),
    ("report-garbage-results", ["report", "{d}/garbage-results"], "results.json"),
    ("report-list-results", ["report", "{d}/list-results"], "results.json"),
    ("report-no-rows", ["report", "{d}/norows-results"], "rows"),
    ("report-out-unwritable", ["report", "{d}/norows-results", "--out", "/proc/x/report.html"], "results.json"),
    # --- evaluate
    ("eval-missing", ["evaluate", "{d}/missing.safetensors", "--out", "{out}"], "not found"),
    ("eval-garbage", EV[:1] + ["{d}/garbage.safetensors"] + EV[2:], "garbage"),
    ("eval-nan", EV[:1] + ["{d}/nan.safetensors"] + EV[2:], "non-finite"),
    ("eval-toy", EV[:1] + ["{d}/toy.safetensors"] + EV[2:], "digits"),
    ("eval-samples-small", EV + ["--samples", "3"], "samples"),
    ("eval-weight-nan", EV + ["--guider", "cfg", "--weight", "nan"], "finite"),
    ("eval-guider-unknown", EV + ["--guider", "bogus"], "unknown guider"),
    ("eval-interval-bad", EV + ["--guider", "cfg", "--weight", "2", "--interval", "-1-2"], "interval"),
    ("eval-device-bogus", EV + ["--device", "bogus"], "device"),
    ("eval-threads-0", EV + ["--threads", "0"], "threads"),
    ("eval-classifier-missing", EV + ["--classifier", "{d}/missing.safetensors"], "missing"),
    ("eval-classifier-garbage", EV + ["--classifier", "{d}/garbage.safetensors"], "garbage"),
    ("eval-label-range", EV + ["--label", "12"], "out of range"),
    ("eval-sigma-max-inf", EV + ["--sigma-max", "inf"], "sigma"),
    ("eval-step-0", EV + ["--step", "0"], "step"),
    ("eval-option-bogus", EV + ["--guider", "tsg", "--weight", "2", "--option", "bogus=1"], "bogus"),
    # --- train
    ("train-set-no-eq", TR + ["--set", "lr"], "KEY=VALUE"),
    ("train-set-empty-key", TR + ["--set", "=3"], "KEY=VALUE"),
    ("train-lr-text", TR + ["--set", "lr=abc"], "lr"),
    ("train-lr-neg", TR + ["--set", "lr=-1"], "lr"),
    ("train-lr-nan", TR + ["--set", "lr=NaN"], "lr"),
    ("train-ema-empty", TR + ["--set", "ema=[]"], "ema"),
    ("train-ema-big", TR + ["--set", "ema=0.5"], "ema"),
    ("train-ema-text", TR + ["--set", "ema=abc"], "ema"),
    ("train-ema-scalar", TR + ["--set", "ema=0.05"], "ema"),
    ("train-ema-bool", TR + ["--set", "conditional=3"], "conditional"),
    ("train-resolution-text", TR + ["--set", "resolution=big"], "resolution"),
    ("train-key-unknown", TR + ["--set", "bogus=1"], "bogus"),
    ("train-model-unknown", TR + ["--set", "model=Bogus"], "model"),
    ("train-iters-0", TR + ["--set", "iters=0"], "iters"),
    ("train-iters-text", TR + ["--set", "iters=many"], "iters"),
    ("train-batch-0", TR + ["--set", "batch=0"], "batch"),
    ("train-hidden-huge", TR + ["--set", "hidden=10000000"], "limit"),
    ("train-config-list", ["train", "--out", "{out}", "--config", "{d}/list.json"], "object"),
    ("train-config-garbage", ["train", "--out", "{out}", "--config", "{d}/garbage.json"], "cannot read"),
    ("train-config-missing", ["train", "--out", "{out}", "--config", "{d}/missing.json"], "missing.json"),
    ("train-device-bogus", TR + ["--device", "bogus"], "device"),
    ("train-threads-0", TR + ["--threads", "0"], "threads"),
    ("train-checkpoint-0", TR + ["--checkpoint-every", "0"], "checkpoint-every"),
    ("train-grid-w", TR + ["--grid-w", "0.5"], "grid-w"),
    ("train-data-missing", TR + ["--set", "data={d}/missing-dir"], "missing-dir"),
    ("train-data-empty-class", TR + ["--set", "data={d}/images"], "hold no images"),
    ("train-out-unwritable", ["train", "--out", "/proc/guidelab-train", "--quiet", "--set", "iters=2"], "proc"),
    # --- classifier
    ("classifier-steps-0", ["classifier", "--out", "{out}/c.safetensors", "--steps", "0"], "steps"),
    ("classifier-exists", ["classifier", "--out", "{d}/cond.safetensors", "--steps", "1"], "exists"),
    ("classifier-threads-0", ["classifier", "--out", "{out}/c.safetensors", "--threads", "0"], "threads"),
    ("classifier-seed-text", ["classifier", "--out", "{out}/c.safetensors", "--seed", "x"], "seed"),
    # --- phema
    ("phema-missing", PH, "norun"),
    ("phema-sigma-rel-big", ["phema", "{d}/emptydir", "--sigma-rel", "0.5", "--out", "{out}/g.safetensors"], "sigma"),
    ("phema-no-snapshots", ["phema", "{d}/emptydir", "--sigma-rel", "0.05", "--out", "{out}/g.safetensors"], "snapshot"),
    ("phema-step-0", ["phema", "{d}/emptydir", "--sigma-rel", "0.05", "--step", "0", "--out", "{out}/g.safetensors"], "step"),
    ("phema-sigma-rel-text", ["phema", "{d}/emptydir", "--sigma-rel", "x", "--out", "{out}/g.safetensors"], "sigma-rel"),
    # --- distill
    ("distill-missing", ["distill", "{d}/missing.safetensors", "--out", "{out}"], "missing"),
    ("distill-garbage", ["distill", "{d}/garbage.safetensors", "--out", "{out}", "--iters", "2", "--quiet"], "garbage"),
    ("distill-nan", ["distill", "{d}/nan.safetensors", "--out", "{out}", "--iters", "2", "--quiet"], "non-finite"),
    ("distill-guider", DI + ["--guider", "bogus"], "unknown guider"),
    ("distill-w-order", DI + ["--w-min", "5", "--w-max", "2"], "w"),
    ("distill-w-nan", DI + ["--w-max", "nan"], "w"),
    ("distill-to-steps-alone", DI + ["--to-steps", "2"], "progressive"),
    ("distill-progressive-no-to", DI + ["--progressive"], "to-steps"),
    ("distill-ema-text", DI + ["--ema", "a,b"], "numbers"),
    ("distill-ema-big", DI + ["--ema", "0.9"], "teacher"),
    ("distill-lr-neg", DI + ["--lr", "-1"], "lr"),
    ("distill-lr-nan", DI + ["--lr", "nan"], "lr"),
    ("distill-sigma-max-inf", DI + ["--progressive", "--to-steps", "2", "--sigma-max", "inf"], "distilled student"),
    ("distill-iters-0", DI + ["--iters", "0"], "iters"),
    ("distill-seed-neg", DI + ["--seed", "-1"], "seed"),
    ("distill-device-bogus", DI + ["--device", "bogus"], "device"),
    ("distill-guide-missing", DI + ["--guider", "autoguidance", "--guide", "{d}/missing.safetensors"], "teacher"),
    ("distill-autoguidance-no-guide", DI + ["--guider", "autoguidance"], "guide"),
    # --- diffusers (no model folder here: every row fails before diffusers is imported)
    ("diffusers-missing", ["diffusers", "{d}/missing-dir", "--out", "{out}"], "missing-dir"),
    ("diffusers-empty", ["diffusers", "{d}/emptydir", "--out", "{out}"], "emptydir"),
    ("diffusers-seeds-text", ["diffusers", "{d}/emptydir", "--out", "{out}", "--seeds", "a-b"], "seeds"),
    ("diffusers-seeds-reversed", ["diffusers", "{d}/emptydir", "--out", "{out}", "--seeds", "7-0"], "seed"),
    ("diffusers-seeds-neg", ["diffusers", "{d}/emptydir", "--out", "{out}", "--seeds", "-1,2"], "seeds"),
    ("diffusers-seeds-empty", ["diffusers", "{d}/emptydir", "--out", "{out}", "--seeds", ""], "seed"),
    ("diffusers-guider", ["diffusers", "{d}/emptydir", "--out", "{out}", "--guider", "bogus"], "unknown guider"),
    ("diffusers-interval", ["diffusers", "{d}/emptydir", "--out", "{out}", "--interval", "x"], "interval"),
    (
        "diffusers-weight-nan",
        ["diffusers", "{d}/emptydir", "--out", "{out}", "--guider", "cfg", "--weight", "nan"],
        "config.json",
    ),
    ("diffusers-steps-0", ["diffusers", "{d}/emptydir", "--out", "{out}", "--steps", "0"], "steps"),
    ("diffusers-block-neg", ["diffusers", "{d}/emptydir", "--out", "{out}", "--block", "-1"], "block"),
    ("diffusers-schedule-bad", ["diffusers", "{d}/emptydir", "--out", "{out}", "--schedule", "bogus"], "pipeline"),
    ("diffusers-prompt-missing", ["diffusers", "{d}/emptydir", "--out", "{out}", "--prompt-embeds", "{d}/missing.st"], "missing"),
    (
        "diffusers-prompt-garbage",
        ["diffusers", "{d}/emptydir", "--out", "{out}", "--prompt-embeds", "{d}/garbage.safetensors"],
        "garbage",
    ),
    # --- guiders / samplers / demo / convert-edm2
    ("guiders-arg", ["guiders", "extra"], "extra"),
    ("samplers-arg", ["samplers", "extra"], "extra"),
    ("demo-samples-small", ["demo", "--out", "{out}", "--samples", "4"], "samples"),
    ("demo-seed-text", ["demo", "--out", "{out}", "--seed", "x"], "seed"),
    ("demo-out-file", ["demo", "--out", "{d}/cond.safetensors", "--quick", "--samples", "16"], "is a file"),
    ("convert-missing", ["convert-edm2", "{d}/missing.pkl", "--out", "{out}/x.safetensors"], "missing.pkl"),
    ("convert-garbage", ["convert-edm2", "{d}/garbage.safetensors", "--out", "{out}/x.safetensors"], "garbage"),
    ("command-unknown", ["bogus"], "bogus"),
    # --- issue 15/16 options: --threads, --device, --weight schedules, --sigma-rel on a file, sweep --guide, ...
    ("sample-threads-0", W + ["--threads", "0"], "threads"),
    ("sample-threads-text", W + ["--threads", "x"], "threads"),
    ("sample-device-bogus", W + ["--device", "bogus"], "device"),
    ("sample-device-cuda-index", W + ["--device", "cuda:99"], "cuda"),
    ("sample-device-tpu", W + ["--device", "xla"], "device"),
    ("sample-weight-schedule-unknown", W + ["--guider", "cfg", "--weight", "bogus:1-2"], "weight schedule"),
    ("sample-weight-schedule-text", W + ["--guider", "cfg", "--weight", "linear:a-b"], "--weight"),
    ("sample-weight-schedule-option", W + ["--guider", "cfg", "--weight", "linear:1-4:bogus=1"], "bogus"),
    ("sample-weight-steps-no-range", W + ["--guider", "cfg", "--weight", "steps:2-1"], "steps"),
    ("sample-weight-interval-no-sigmas", W + ["--guider", "cfg", "--weight", "interval:2-1"], "sigma_lo"),
    ("sample-weight-constant-two", W + ["--guider", "cfg", "--weight", "constant:1-2"], "constant"),
    ("sample-weight-schedule-no-guider", W + ["--weight", "linear:1-4"], "guider"),
    ("sample-weight-schedule-nan", W + ["--guider", "cfg", "--weight", "linear:nan-2"], "finite"),
    ("sample-sigma-rel-on-file", M + ["--sigma-rel", "0.05"], "--sigma-rel"),
    ("sample-sigma-rel-on-world", W + ["--sigma-rel", "0.05"], "--sigma-rel"),
    (
        "sample-guide-sigma-rel-on-file",
        M + ["--guider", "autoguidance", "--weight", "2", "--guide", "{d}/cond.safetensors", "--guide-sigma-rel", "0.05"],
        "--guide-sigma-rel",
    ),
    ("sample-nonfinite-flag-value", W + ["--allow-nonfinite=yes"], "allow-nonfinite"),
    ("sweep-threads-0", SW + ["--threads", "0"], "threads"),
    ("sweep-device-bogus", SW + ["--device", "bogus"], "device"),
    ("sweep-weights-schedule-bad", SW[:-2] + ["--weights", "2,bogus:1-2"], "weights"),
    ("sweep-weights-schedule-option", SW[:-2] + ["--weights", "2,linear:1-4:bogus=1"], "weights"),
    ("sweep-guide-method-not-swept", SW + ["--guide", "autoguidance={d}/cond.safetensors"], "not one of --methods"),
    ("sweep-guide-twice", SW + ["--guide", "{d}/cond.safetensors", "--guide", "{d}/uncond.safetensors"], "twice"),
    ("sweep-guide-method-twice", SW + ["--guide", "cfg={d}/cond.safetensors", "--guide", "cfg={d}/uncond.safetensors"], "twice"),
    ("sweep-guide-method-missing", SW + ["--guide", "cfg={d}/missing.safetensors"], "not found"),
    ("sweep-uncond-and-guide", SW + ["--uncond", "{d}/uncond.safetensors", "--guide", "cfg={d}/cond.safetensors"], "both"),
    ("sweep-sigma-rel-on-file", SW + ["--model", "{d}/cond.safetensors", "--sigma-rel", "0.05"], "--sigma-rel"),
    ("eval-weight-schedule-bad", EV + ["--guider", "cfg", "--weight", "linear:x"], "weight"),
    ("eval-sigma-rel-on-file", EV + ["--sigma-rel", "0.05"], "--sigma-rel"),
    ("eval-device-cuda-index", EV + ["--device", "cuda:99"], "cuda"),
    ("demo-threads-0", ["demo", "--out", "{out}", "--threads", "0"], "threads"),
    ("train-channels-disagree", TR + ["--set", "data={d}/rgb", "--set", "channels=1"], "RGB"),
    ("train-device-cuda-index", TR + ["--device", "cuda:99"], "cuda"),
    ("distill-threads-0", DI + ["--threads", "0"], "threads"),
    ("distill-sigma-rel-on-file", DI + ["--sigma-rel", "0.05"], "--sigma-rel"),
    ("distill-guide-sigma-rel-on-file", DI + ["--guide-sigma-rel", "0.05"], "--guide-sigma-rel"),
    ("distill-device-cuda-index", DI + ["--device", "cuda:99"], "cuda"),
    ("classifier-quiet-value", ["classifier", "--out", "{out}/c.safetensors", "--quiet=1"], "quiet"),
    ("diffusers-threads-0", ["diffusers", "{d}/emptydir", "--out", "{out}", "--threads", "0"], "threads"),
    ("diffusers-device-bogus", ["diffusers", "{d}/emptydir", "--out", "{out}", "--device", "bogus"], "device"),
    ("diffusers-label-beyond-classes", ["diffusers", "{d}/dit", "--out", "{out}", "--label", "5000"], "out of range"),
    ("diffusers-null-label-beyond", ["diffusers", "{d}/dit", "--out", "{out}", "--null-label", "1001"], "out of range"),
    ("diffusers-weight-schedule-bad", ["diffusers", "{d}/emptydir", "--out", "{out}", "--weight", "bogus:1-2"], "weight"),
    ("generate-threads-0", ["generate", "{d}/emptydir", "--prompt", "x", "--out", "{out}", "--threads", "0"], "threads"),
    ("generate-device-bogus", ["generate", "{d}/emptydir", "--prompt", "x", "--out", "{out}", "--device", "bogus"], "device"),
    ("generate-height-small", ["generate", "{d}/emptydir", "--prompt", "x", "--out", "{out}", "--height", "4"], "height"),
    ("generate-width-text", ["generate", "{d}/emptydir", "--prompt", "x", "--out", "{out}", "--width", "w"], "width"),
    ("generate-guidance-text", ["generate", "{d}/emptydir", "--prompt", "x", "--out", "{out}", "--guidance", "x"], "guidance"),
    (
        "generate-guidance-as-option",
        ["generate", "{d}/emptydir", "--prompt", "x", "--out", "{out}", "--guider", "none", "--option", "guidance=3.5"],
        "give --guidance 3.5",
    ),
    (
        "inverse-threads-0",
        ["inverse", "digits-gmm", "--task", "inpaint", "--method", "dps", "--input", "{d}/cond.safetensors"]
        + ["--out", "{out}", "--threads", "0"],
        "threads",
    ),
]


def _save_net(path, **kw):
    torch.manual_seed(0)
    net = PixelMLP(hidden=8, depth=1, emb=4, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model(path, net)
    return net


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("bad")
    _save_net(d / "cond.safetensors", num_classes=10)
    _save_net(d / "uncond.safetensors", num_classes=0)
    _save_net(d / "other-shape.safetensors", num_classes=10, img_channels=3)
    from guidelab.models import registry

    save_model(d / "toy.safetensors", registry.build({"name": "ToyMLP", "dim": 2}))
    with safe_open(str(d / "cond.safetensors"), "pt") as f:
        meta = f.metadata()
    t = load_file(d / "cond.safetensors")
    for name, v in (("nan", float("nan")), ("inf", float("inf"))):
        bad = dict(t)
        k = next(k for k in bad if bad[k].is_floating_point())
        bad[k] = bad[k].clone().fill_(v)
        save_file(bad, d / f"{name}.safetensors", metadata=meta)
    huge = {k: v.replace('"hidden": 8', '"hidden": 10000000') for k, v in meta.items()}
    assert huge != meta
    save_file(t, d / "huge.safetensors", metadata=huge)
    (d / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!" * 10)
    (d / "empty.safetensors").write_bytes(b"")
    (d / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n.")
    (d / "list.json").write_text("[1, 2]")
    (d / "garbage.json").write_text("{not json")
    (d / "emptydir").mkdir()
    for name, text in (("garbage-job", "{oops"), ("list-job", "[]"), ("other-job", json.dumps({"config": {}, "n": 1}))):
        (d / name).mkdir()
        (d / name / "job.json").write_text(text)
    for name, text in (("garbage-results", "{oops"), ("list-results", "[]"), ("norows-results", '{"best": {}}')):
        (d / name).mkdir()
        (d / name / "results.json").write_text(text)
    np.savez(d / "nosamples.npz", x=np.zeros((4, 2)))
    np.savez(d / "object.npz", samples=np.array([{"a": 1}, None], dtype=object))
    np.savez(d / "wrongshape.npz", samples=np.zeros((20, 3)))
    from PIL import Image

    (d / "rgb" / "0").mkdir(parents=True)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour, "RGB").save(d / "rgb" / "0" / "a.png")
    (d / "dit" / "transformer").mkdir(parents=True)
    (d / "dit" / "transformer" / "config.json").write_text(json.dumps({"num_embeds_ada_norm": 1000}))
    (d / "images" / "0").mkdir(parents=True)
    (d / "images" / "1").mkdir()

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "images" / "0" / "a.png")
    return d


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.mark.parametrize("name,args,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_error_and_writes_nothing(d, tmp_path, name, args, fragment):
    out = tmp_path / "out"
    args = [a.format(d=d, out=out) for a in args]
    before = _tree(d)
    r = CliRunner().invoke(cli.main, args)
    text, code = r.output + (r.stderr if r.stderr_bytes is not None else ""), r.exit_code
    if isinstance(r.exception, GuidelabError):  # what cli.run prints: "error: ...", exit 2
        text, code = text + f"error: {r.exception}", 2
    else:
        assert isinstance(r.exception, SystemExit), f"{r.exception!r}: {text[-500:]}"  # a click usage error
    assert code == 2, f"exit {code}: {text[-500:]}"
    assert "Traceback" not in text and len(str(r.exception or "").splitlines()) <= 1
    assert "error:" in text.lower()
    assert fragment.lower() in text.lower(), text
    assert not out.exists(), f"{name} wrote {list(out.rglob('*'))}"
    assert _tree(d) == before


def test_table_has_150_rows_over_every_command():
    assert len(ROWS) >= 150
    assert {r[1][0] for r in ROWS} >= {
        "sample",
        "sweep",
        "report",
        "evaluate",
        "train",
        "classifier",
        "phema",
        "distill",
        "diffusers",
        "guiders",
        "samplers",
        "demo",
        "generate",
        "inverse",
    }


@pytest.mark.parametrize(
    "args",
    [(8, 0.002, float("inf")), (8, 0.002, 1e30), (8, float("nan"), 80.0), (8.5, 0.002, 80.0), (8, 0.002, True), (0, 0.002, 80.0)],
)
def test_karras_refuses_bad_ranges(args):
    from guidelab import schedules

    with pytest.raises(GuidelabError):
        schedules.karras(*args)
