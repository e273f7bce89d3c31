"""Shared fixtures: tiny random snapshots built once per test session, a way to run the CLI with torch
unimportable (as users run it), and the web app running on the demo model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app_server import running_app
from tiny_snapshots import TinySpec, build_snapshot

ROOT = Path(__file__).resolve().parent.parent

# Two architectures: the default tiny TI2V, and one with other head/layer counts, channels and VAE depth,
# whose weights are stored in bfloat16 like the published snapshot.
SPECS = {
    "small": TinySpec(),
    "wide": TinySpec(heads=3, head_dim=24, layers=3, ffn_dim=96, z_dim=16, text_dim=48, text_heads=4,
                     text_layers=3, vae_res_blocks=2, flow_shift=3.0, seed=1, dtype="bfloat16"),
}


@pytest.fixture(scope="session")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {name: build_snapshot(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def no_torch_env(tmp_path_factory):
    """Environment for a subprocess in which `import torch` fails and torch looks absent to importlib."""
    site = tmp_path_factory.mktemp("no_torch")
    (site / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'torchvision', 'torchaudio', 'diffusers'):\n    sys.modules[name] = None\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_cli(args, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wan_engine", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=600,
    )


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """The demo model and the prompt-embedding cache go to a fresh folder, for this process and subprocesses."""
    os.environ["WAN_STUDIO_CACHE"] = str(tmp_path_factory.mktemp("wan-studio-cache"))


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, isolated_cache):
    """A real `python app.py --demo` on a free port, shared by the app's API and browser tests."""
    with running_app(tmp_path_factory.mktemp("app")) as server:
        yield server
