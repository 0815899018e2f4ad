"""The API reference (mkdocs + mkdocstrings, mkdocs.yml, docs/api/) builds with --strict, and every public
name of each documented module (its ``__all__``) has an entry on its page. The build takes 6-10 s on two
busy cores, so it runs in the slow set (pytest -m slow); the nav check runs by default."""

import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "denoisers": "guidelab.denoisers",
    "guidance": "guidelab.guidance",
    "samplers": "guidelab.samplers",
    "schedules": "guidelab.schedules",
    "rng": "guidelab.rng",
    "toy": "guidelab.toy",
    "models": "guidelab.models",
    "training": "guidelab.training",
    "metrics": "guidelab.metrics",
    "inverse": "guidelab.inverse",
    "diffusers": "guidelab.integrations.diffusers",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for mod in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod, reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_every_api_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.stem for p in (ROOT / "docs" / "api").glob("*.md"))
    assert pages == sorted([*PAGES, "index"])
    assert all(f"api/{p}.md" in nav for p in pages)


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_public_name_has_an_entry(site, page):
    mod = PAGES[page]
    if page == "diffusers":
        pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
    m = importlib.import_module(mod)
    text = (site / "api" / page / "index.html").read_text()
    ids = set(re.findall(r'id="(guidelab\.[\w.]+)"', text))
    missing = []
    public = getattr(m, "__all__", None) or [  # modules without __all__: what they define themselves
        n for n, o in vars(m).items() if not n.startswith("_") and getattr(o, "__module__", None) == mod
    ]
    for name in public:
        obj = getattr(m, name)
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj):
            # rendered from the package or from the submodule that defines it
            ok = f"{mod}.{name}" in ids or any(i.startswith(mod + ".") and i.endswith("." + name) for i in ids)
        else:  # a constant: an entry or at least named on the page
            ok = any(i.endswith("." + name) for i in ids) or f"<code>{name}</code>" in html.unescape(text)
        if not ok:
            missing.append(name)
    assert not missing, f"docs/api/{page}.md lacks an entry for {missing}"
    # the page carries the module's own docstring (first line)
    first = inspect.getdoc(m).splitlines()[0].split("``")[0].strip()
    assert html.escape(first[:30], quote=False) in text
