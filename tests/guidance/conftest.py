"""Shared fixtures of the guidance tests."""

import pytest

from guidelab.training import load_model, snapshot_path, train_toy


@pytest.fixture(scope="session")
def toy_snapshots(tmp_path_factory):
    """A small ToyMLP trained on class A of the exact tree by exact-score matching (300 iterations); returns
    (its EMA snapshot at 40 iterations — a real weaker network, Karras et al.'s "shorter training" — and the
    final one), both in eval mode. Trained once per test process."""
    final = train_toy(
        tmp_path_factory.mktemp("run"),
        classes="A",
        hidden=32,
        depth=3,
        output="denoiser",
        loss="edm",
        iters=300,
        batch=512,
        snapshot_every=20,
        progress=False,
    )
    return load_model(snapshot_path(final.parent, 40, 0.010)).eval(), load_model(final).eval()
