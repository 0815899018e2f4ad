"""NVlabs network pickles: built here with the structure torch_utils.persistence writes, loaded without
running anything from the file, refused when they reference anything else."""

import json
import pickle
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors import safe_open

from guidelab.errors import GuidelabError
from guidelab.models import edm2, nvlabs_pickle
from guidelab.training import load_model, save_model
from guidelab.training.phema import load_network

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "edm2" / "edm2_tiny_cond.safetensors"
HARMLESS_SRC = "# networks_edm2.py\nimport torch\nclass Precond(torch.nn.Module):\n    pass\n"
NV_NAMES = {edm2.EDM2: "Precond", edm2.UNet: "UNet", edm2.Block: "Block", edm2.MPConv: "MPConv", edm2.MPFourier: "MPFourier"}


class Record:
    """A persistent object that is not a network (the pickle's encoder and loss)."""

    def __init__(self, class_name, **state):
        self.class_name, self.state = class_name, state


def _exec_like_nvlabs(meta):
    """What NVlabs' torch_utils.persistence does with a record: exec its module_src."""
    module = types.ModuleType("_imported_module_test")
    exec(meta["module_src"], module.__dict__)
    return meta["class_name"]


def fake_modules(reconstruct=_exec_like_nvlabs):
    """sys.modules entries for torch_utils.persistence and dnnlib.util (pickle names globals by them)."""
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    reconstruct.__module__, reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    persistence = types.SimpleNamespace(_reconstruct_persistent_obj=reconstruct)
    util = types.SimpleNamespace(EasyDict=easy)
    return {
        "torch_utils": types.SimpleNamespace(persistence=persistence),
        "torch_utils.persistence": persistence,
        "dnnlib": types.SimpleNamespace(util=util),
        "dnnlib.util": util,
    }, easy


class NVPickler(pickle.Pickler):
    """Writes our EDM2 modules the way torch_utils.persistence writes NVlabs' (same globals and opcodes)."""

    def __init__(self, f, module_src, reconstruct):
        super().__init__(f, protocol=4)
        self.module_src, self.reconstruct = module_src, reconstruct

    def reducer_override(self, obj):
        if isinstance(obj, Record):
            name, state = obj.class_name, obj.state
        elif type(obj) in NV_NAMES:
            name = NV_NAMES[type(obj)]
            state = {
                k: v
                for k, v in obj.__dict__.items()  # torch's module state and plain attributes, as NVlabs'
                if k.startswith("_") or isinstance(v, (int, float, str, list, tuple, type(None)))
            }
            state["_init_args"], state["_init_kwargs"] = (), (obj.config() if name == "Precond" else {})
        else:
            return NotImplemented
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=name, state=state)
        return self.reconstruct, (meta,)


def write_pkl(path, net, module_src=HARMLESS_SRC, latent=False, extra=None):
    """An NVlabs-structured network pickle: EasyDict(dataset_kwargs, loss_fn, encoder, ema)."""
    modules, easy = fake_modules()
    encoder = (
        Record(
            "StabilityVAEEncoder",
            vae_name="stabilityai/sd-vae-ft-mse",
            batch_size=8,
            _vae=None,
            scale=np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]),
            bias=np.zeros(4, np.float32),
            _init_args=(),
            _init_kwargs={"final_std": 0.5},
        )
        if latent
        else Record("StandardRGBEncoder", _init_args=(), _init_kwargs={})
    )
    data = easy(
        dataset_kwargs=easy(class_name="training.dataset.ImageFolderDataset", path="x.zip", use_labels=True),
        loss_fn=Record("EDM2Loss", P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(), _init_kwargs={}),
        encoder=encoder,
        ema=net,
        **(extra or {}),
    )
    with mock.patch.dict(sys.modules, modules), open(path, "wb") as f:
        NVPickler(f, module_src, modules["torch_utils.persistence"]._reconstruct_persistent_obj).dump(data)
    return path


def globals_in(path):
    """Every global the file names (recorded by the restricted unpickler as it resolves them)."""
    names = set()

    class Trace(nvlabs_pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Trace(f).load()
    return names


def reference_net():
    with safe_open(str(REF), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        kwargs = json.loads(f.metadata()["precond_kwargs"])
    return edm2.from_nvlabs(kwargs, t), t


def test_reference_network_through_a_pickle(tmp_path):
    net, t = reference_net()
    path = write_pkl(tmp_path / "edm2-tiny.pkl", net)
    assert globals_in(path) == {
        "torch_utils.persistence._reconstruct_persistent_obj",
        "collections.OrderedDict",
        "dnnlib.util.EasyDict",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_tensor_v2",
        "torch.storage._load_from_bytes",
        "torch.nn.modules.container.ModuleDict",
    }  # exactly the list
    back = edm2.load_pkl(path)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    x, sigma, y = t["input.x"], t["input.sigma"], t["input.class_labels"]
    assert (back(x, sigma, class_labels=y) - t["output.D"]).abs().max() <= 1e-5
    assert (back.logvar(sigma) - t["output.logvar"]).abs().max() <= 1e-5
    assert back.checkpoint_info["encoder"] == {"class_name": "StandardRGBEncoder", "init_kwargs": {}}


def test_second_config_round_trips_pkl_and_safetensors(tmp_path):
    torch.manual_seed(0)
    net = edm2.EDM2(
        img_resolution=16,
        img_channels=4,
        label_dim=0,
        use_fp16=True,
        logvar_channels=8,
        model_channels=8,
        channel_mult=[1, 2, 3],
        num_blocks=2,
        attn_resolutions=[4],
        channels_per_head=8,
        res_balance=0.4,
        attn_balance=0.2,
        concat_balance=0.6,
        clip_act=2.0,
        dropout=0.1,
    ).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.randn([]))
    path = write_pkl(tmp_path / "edm2-img512-xs-uncond-0134217-0.110.pkl", net, latent=True)
    names = globals_in(path)
    assert {"numpy.ndarray", "numpy.dtype"} <= names and any(n.endswith("multiarray._reconstruct") for n in names)
    back = edm2.load_pkl(path)
    assert back.config() == net.config()
    x = torch.randn(3, 4, 16, 16)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    D = net(x, sigma)
    assert torch.equal(back(x, sigma), D) and torch.equal(back.logvar(sigma), net.logvar(sigma))
    info = back.checkpoint_info
    assert info["encoder"]["class_name"] == "StabilityVAEEncoder"
    assert edm2.Standardization.of(info["encoder"]).final_std == 0.5
    again = load_model(save_model(tmp_path / "net.safetensors", back, encoder=info["encoder"]))
    assert torch.equal(again(x, sigma), D)
    assert torch.equal(load_network(path)(x, sigma), D)  # every command's loader takes the .pkl


def test_module_src_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil_src = f"open({str(marker)!r}, 'w').write('ran')\n"
    net, _ = reference_net()
    path = write_pkl(tmp_path / "evil.pkl", net, module_src=evil_src)
    modules, _ = fake_modules()
    with mock.patch.dict(sys.modules, modules):  # even with NVlabs-like modules importable, none is used
        back = edm2.load_pkl(path)
    assert not marker.exists() and isinstance(back, edm2.EDM2)
    rec, _ = nvlabs_pickle.network_record(path)
    assert rec.module_src == evil_src  # kept as text
    with mock.patch.dict(sys.modules, modules):  # the file is truly malicious: pickle.load runs it
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "ran"


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return os.system, (self.cmd,)


def test_unknown_globals_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    net, _ = reference_net()
    path = write_pkl(tmp_path / "evil.pkl", net, extra={"hook": _System(f"touch {marker}")})
    with pytest.raises(GuidelabError, match=r"refused global (posix|os)\.system"):
        edm2.load_pkl(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"  # protocol 0, GLOBAL opcode naming os.system directly
    raw.write_bytes(f"cos\nsystem\n(V touch {marker}\ntR.".encode())
    with pytest.raises(GuidelabError, match=r"refused global os\.system"):
        edm2.load_pkl(raw)
    for module, name in (("builtins", "exec"), ("torch_utils.persistence", "_src_to_module"), ("torch", "load")):
        raw.write_bytes(f"c{module}\n{name}\n(V1\ntR.".encode())
        with pytest.raises(GuidelabError, match=f"refused global {module}.{name}"):
            edm2.load_pkl(raw)
    assert not marker.exists()


def test_bad_files(tmp_path):
    net, _ = reference_net()
    path = write_pkl(tmp_path / "a.pkl", net)
    with pytest.raises(GuidelabError, match="no 'gnet' entry"):
        edm2.load_pkl(path, key="gnet")
    with pytest.raises(GuidelabError, match="not an EDM2 Precond"):
        edm2.load_pkl(path, key="loss_fn")
    (tmp_path / "t.pkl").write_bytes(path.read_bytes()[:100])
    with pytest.raises(GuidelabError, match="not a readable NVlabs pickle"):
        edm2.load_pkl(tmp_path / "t.pkl")
    with pytest.raises(GuidelabError, match="cannot read"):
        edm2.load_pkl(tmp_path / "missing.pkl")
