"""Finding a model: a local folder, the offline demo model, or a Hugging Face repo id resolved through the
Hugging Face cache (downloaded when missing, resumable, only the files the engine reads); and single files of a Hub
repo (LoRAs), resolved through the same cache."""

import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import WanError

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


@contextmanager
def hub_errors(what: str, how_to_get_it: str):
    """huggingface_hub's failures while fetching `what` (a model, a file) -> one WanError sentence each."""
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if is_offline() else "the Hugging Face Hub cannot be reached"
        raise WanError(f"{what} is not in the Hugging Face cache and {why}: {how_to_get_it}") from None
    except (RepositoryNotFoundError, GatedRepoError, EntryNotFoundError) as e:
        raise WanError(f"{what} cannot be downloaded: {type(e).__name__} (check the name and your access)") from None
    except OSError as e:
        raise WanError(f"downloading {what} failed: {e.strerror or e} (run the same command again to resume)") from None


def download(repo_id: str, progress=None) -> Path:
    """Fetch (or find in the cache) the snapshot of `repo_id`; returns its folder in the Hugging Face cache.

    huggingface_hub writes each file as `.incomplete` and renames it when whole, so an interrupted download
    leaves no half-written file and resumes where it stopped."""
    from huggingface_hub import snapshot_download

    with hub_errors(f"the model {repo_id}",
                    f"download it first with `python -m wan_engine download --model {repo_id}` while online"):
        return Path(snapshot_download(
            repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=is_offline(),
            tqdm_class=_progress_class(progress),
        ))


def download_file(reference: str, progress=None) -> Path:
    """One file of a Hub repo, written `owner/repo/path/in/repo` (a LoRA), fetched or found in the Hugging Face
    cache like a model; returns its path in the cache."""
    from huggingface_hub import hf_hub_download

    owner, repo, filename = reference.split("/", 2)
    with hub_errors(f"the Hub file {reference}", "run once while online to download it"):
        return Path(hf_hub_download(f"{owner}/{repo}", filename, local_files_only=is_offline(),
                                    tqdm_class=_progress_class(progress)))


def looks_like_hub_file(reference: str) -> bool:
    """`owner/repo/path/in/repo`: three or more non-empty parts, not a relative or home path."""
    parts = reference.split("/")
    return len(parts) >= 3 and all(parts) and not reference.startswith((".", "~")) and "\\" not in reference


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
