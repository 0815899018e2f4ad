"""``Pipeline.generate(guider="nag")`` reaches NAG on PixArt and FLUX pipelines (tiny random pipelines from
test_diffusers_pipelines_families): it changes the image, w = 1 is the unguided run bit for bit, also with CFG
in the same call."""

import pytest
import torch

pytest.importorskip("diffusers")
import test_diffusers_pipelines_families as fam  # tests/integrations is on sys.path (rootdir imports)

from guidelab.integrations.diffusers import load_pipeline


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_generate_with_nag_on_pixart_and_flux(tmp_path, family):
    folder = fam.pixart_folder(tmp_path) if family == "pixart" else fam.flux_folder(tmp_path)
    pipe = load_pipeline(folder)
    kw = {**(fam.FLUX_SIZE if family == "flux" else {}), "steps": 3, "seeds": [0], "negative_prompt": "dark"}
    base = pipe.generate("a cube", guider="none", **{k: v for k, v in kw.items() if k != "negative_prompt"})
    x = pipe.generate("a cube", guider="nag", w=4.0, **kw)
    assert x.shape == base.shape and torch.isfinite(x).all() and (x - base).abs().max() > 1e-4
    assert torch.equal(pipe.generate("a cube", guider="nag", w=1.0, **kw), base)
    with_cfg = pipe.generate("a cube", guider="nag", w=4.0, cfg_weight=3.0, **kw)
    assert torch.isfinite(with_cfg).all() and (with_cfg - x).abs().max() > 1e-4
