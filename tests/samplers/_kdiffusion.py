"""Load k-diffusion's ``sampling.py`` alone (a test and bench reference; nothing of it is copied here).

The PyPI package imports torchvision and friends at package level; ``sampling.py`` itself needs only
torch, scipy, torchsde, tqdm, ``torchdiffeq.odeint`` (unused by the samplers we compare) and
``utils.append_dims``. Install with ``pip install --no-deps k-diffusion`` (the Makefile does).
"""

import importlib.util
import pathlib
import sys
import types


def load_sampling():
    """The module ``k_diffusion.sampling``, loaded under stub parent modules that are removed again."""
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None and spec.origin, "k-diffusion is not installed: pip install --no-deps k-diffusion"
    path = pathlib.Path(spec.origin).parent / "sampling.py"
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    stubs = {"k_diffusion": pkg, "k_diffusion.utils": utils}
    if importlib.util.find_spec("torchdiffeq") is None:
        stubs["torchdiffeq"] = types.ModuleType("torchdiffeq")
        stubs["torchdiffeq"].odeint = None
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module
