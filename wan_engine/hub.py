"""Finding a model: a local folder, the offline demo model, or a Hugging Face repo id resolved through the
Hugging Face cache (downloaded when missing, resumable, only the files the engine reads)."""

import os
from pathlib import Path

from .errors import WanError

DEFAULT_MODEL = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
# What the engine reads from a Diffusers snapshot; READMEs, example media and other formats are skipped.
ALLOW_PATTERNS = [
    "model_index.json", "wan_studio_package.json", "scheduler/*", "tokenizer/*", "text_encoder/*", "transformer/*",
    "vae/*",
]


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _progress_class(progress):
    """A tqdm class for huggingface_hub that reports (done, total, description) to `progress`."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Reporter(hf_tqdm):
        def update(self, n=1):
            super().update(n)
            if progress and self.total:
                progress(self.n, self.total, self.desc or "downloading")

    return Reporter


def download(repo_id: str, progress=None) -> Path:
    """Fetch (or find in the cache) the snapshot of `repo_id`; returns its folder in the Hugging Face cache.

    huggingface_hub writes each file as `.incomplete` and renames it when whole, so an interrupted download
    leaves no half-written file and resumes where it stopped."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(
            repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=is_offline(),
            tqdm_class=_progress_class(progress),
        ))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if is_offline() else "the Hugging Face Hub cannot be reached"
        raise WanError(
            f"the model {repo_id} is not in the Hugging Face cache and {why}: download it first with "
            f"`python -m wan_engine download --model {repo_id}` while online"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise WanError(f"the model {repo_id} cannot be downloaded: {type(e).__name__} (check the name and your access)") from None
    except OSError as e:
        raise WanError(f"downloading {repo_id} failed: {e.strerror or e} (run the same command again to resume)") from None


def looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def find_local_model(model: str) -> Path | None:
    """The local folder for `--model` when its files are already on this machine (a folder, the demo model, or a
    repo id in the Hugging Face cache), else None; never downloads."""
    if model == "demo":
        from .demo import ensure_demo_model

        return ensure_demo_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not looks_like_repo_id(model):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


def resolve_model(model: str, progress=None) -> Path:
    """The local folder for `--model`: a folder as given, `demo`, or a Hub repo id (downloaded when needed)."""
    if model == "demo":
        from .demo import ensure_demo_model

        return ensure_demo_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WanError(f"--model {model} is a file; give a model folder, a Hugging Face repo id or 'demo'")
    if looks_like_repo_id(model):
        return download(model, progress)
    raise WanError(f"--model {model}: no such folder, and not a Hugging Face repo id like {DEFAULT_MODEL}")
