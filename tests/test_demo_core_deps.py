"""`make demo` installs only guidelab's core dependencies (Makefile ``.installed-core``): the demo must run
without any optional package, here hidden from ``import`` and ``importlib.import_module`` in a fresh interpreter
(the packages stay findable, as torch's own probes expect, but cannot be imported)."""

from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL = ("sklearn", "scipy", "diffusers", "transformers", "tokenizers", "torchsde", "k_diffusion", "mkdocs", "pytest")

SCRIPT = """
import builtins, importlib, sys
OPTIONAL = set({optional!r})
_import, _import_module = builtins.__import__, importlib.import_module

def hidden(name):
    return ModuleNotFoundError(f"No module named {{name!r}} (hidden: not a core dependency)", name=name)

def import_(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in OPTIONAL:
        raise hidden(name)
    return _import(name, globals, locals, fromlist, level)

def import_module(name, package=None):
    if not name.startswith(".") and name.split(".")[0] in OPTIONAL:
        raise hidden(name)
    return _import_module(name, package)

builtins.__import__, importlib.import_module = import_, import_module
from guidelab.app.cli import run
sys.argv = ["guidelab", "demo", "--quick", "--samples", "64", "--quiet", "--out", {out!r}]
run()
"""


def test_demo_runs_with_core_dependencies_only(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(optional=OPTIONAL, out=str(out))], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((out / "metrics.json").read_text())["records"]
    assert {rec["method"] for rec in records} == {"none", "cfg", "autoguidance"}
    assert (out / "report.html").exists()


def test_hiding_works(tmp_path):
    """The hiding itself: an optional package that is installed here cannot be imported in the child."""
    code = SCRIPT.split("from guidelab.app.cli")[0].format(optional=OPTIONAL) + "import sklearn\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "not a core dependency" in r.stderr
