"""Finding models by Hugging Face repo id through the Hub cache, offline, as a user meets it."""

import shutil

import numpy as np

from conftest import run_cli

REPO = "wan-studio-tests/tiny-ti2v"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(snapshot, root):
    """A Hugging Face cache (`HF_HUB_CACHE` layout) holding `snapshot` as REPO at its `main` revision."""
    repo_dir = root / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(snapshot, repo_dir / "snapshots" / REVISION)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return root


def test_a_cached_repo_id_runs_offline(snapshots, no_torch_env, tmp_path):
    env = {**no_torch_env, "HF_HUB_CACHE": str(hub_cache_with(snapshots["small"], tmp_path / "hub"))}
    proc = run_cli(["download", "--model", REPO], env)
    assert proc.returncode == 0, proc.stderr
    assert f"{REPO} is ready in" in proc.stdout and REVISION in proc.stdout
    out = tmp_path / "video.mp4"
    proc = run_cli(["generate", "--model", REPO, "--prompt", "a kite", "--width", 64, "--height", 64, "--frames", 5,
                    "--steps", 1, "--seed", 1, "--output", out, "--save-frames", tmp_path / "F.npy"], env)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and np.load(tmp_path / "F.npy").shape == (5, 64, 64, 3)


def test_an_uncached_repo_id_offline_says_how_to_get_it(no_torch_env, tmp_path):
    env = {**no_torch_env, "HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    out = tmp_path / "never.mp4"
    proc = run_cli(["generate", "--model", "someone/not-downloaded", "--prompt", "a kite", "--output", out], env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: the model someone/not-downloaded is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
        "download it first with `python -m wan_engine download --model someone/not-downloaded` while online"
    ]
    assert not out.exists()


def test_a_model_that_is_neither_folder_nor_repo_id(no_torch_env, tmp_path):
    proc = run_cli(["generate", "--model", str(tmp_path / "missing" / "folder"), "--prompt", "a kite"], no_torch_env)
    assert proc.returncode == 1
    assert "no such folder, and not a Hugging Face repo id like Wan-AI/Wan2.2-TI2V-5B-Diffusers" in proc.stderr
    assert "Traceback" not in proc.stderr
