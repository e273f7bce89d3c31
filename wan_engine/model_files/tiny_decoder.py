"""Finding and reading the tiny decoder, TAEW2.2 (`madebyollin/taehv`, MIT; models/taehv.py).

Its weights are published in the taehv GitHub repository as `safetensors/taew2_2.safetensors` (the whole TAEHV,
encoder included, float32). They are looked for, in order: a file or folder given (`--tiny-decoder`); the model
folder's `tiny_decoder/` (the demo model ships random ones there); the cache (`tiny-decoders/` under the cache root);
else downloaded once from the repository at a pinned commit, checked against that commit's git blob id (a SHA-1 of
the file), and kept in the cache. Offline (`HF_HUB_OFFLINE=1`), a missing file is said in one line.
"""

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from safetensors import SafetensorError
from safetensors.numpy import load_file

from ..errors import WanError
from ..models.taehv import WEIGHTS_FILE as FILE_NAME, TAEHVConfig, TAEHVDecoder
from .cache_files import cache_root, partial_name
from .hub import is_offline

COMMIT = "1f14a568f24bf8811e0a0ac601613e04fc1581e8"
URL = f"https://raw.githubusercontent.com/madebyollin/taehv/{COMMIT}/safetensors/{FILE_NAME}"
GIT_BLOB_SHA1 = "9d0ef19504c0b918eb6a8efea1ed8596cf666400"  # `git ls-tree` of that commit
CHUNK = 2**20


def git_blob_sha1(path: Path) -> str:
    """The id git gives a file's content: SHA-1 of "blob <size>\\0" and the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, blob_sha1: str, destination: Path, progress=None) -> Path:
    """Fetch `url` to `destination` under a partial name, check its git blob id, then move it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(destination)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while block := response.read(CHUNK):
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total, FILE_NAME)
        if (found := git_blob_sha1(partial)) != blob_sha1:
            raise WanError(f"the downloaded tiny decoder {url} is not the published file (git blob {found}, "
                           f"expected {blob_sha1}): it was not kept; try again")
        partial.replace(destination)
    except (urllib.error.URLError, OSError) as error:
        raise WanError(f"could not download the tiny decoder from {url} ({error}): download {FILE_NAME} from the "
                       "madebyollin/taehv repository and give it with --tiny-decoder") from None
    finally:
        partial.unlink(missing_ok=True)
    return destination


def local_tiny_decoder(given: str | None, model_root: Path) -> Path | None:
    """The weights file on this machine, or None (nothing is downloaded)."""
    if given:
        path = Path(given).expanduser()
        path = path / FILE_NAME if path.is_dir() else path
        if not path.is_file():
            raise WanError(f"the tiny decoder {given} does not exist: give {FILE_NAME} or a folder holding it")
        return path
    for path in (model_root / "tiny_decoder" / FILE_NAME, cache_root() / "tiny-decoders" / FILE_NAME):
        if path.is_file():
            return path
    return None


def find_tiny_decoder(given: str | None, model_root: Path, progress=None) -> Path:
    """The weights file (see the module docstring for where it is looked for), downloaded when it is nowhere."""
    if path := local_tiny_decoder(given, model_root):
        return path
    if is_offline():
        raise WanError(f"the tiny decoder ({FILE_NAME}) is not on this machine and HF_HUB_OFFLINE is set: download "
                       f"it from {URL} and give it with --tiny-decoder")
    return download(URL, GIT_BLOB_SHA1, cache_root() / "tiny-decoders" / FILE_NAME, progress)


def load_tiny_decoder(path: Path, dtype) -> TAEHVDecoder:
    """The decoder of a TAEHV safetensors file (its decoder's widths read from the weights) in `dtype`."""
    try:
        stored = {name: value for name, value in load_file(str(path)).items() if name.startswith("decoder.")}
        widths = tuple(stored[f"decoder.{i}.weight"].shape[0] for i in (1, 8, 14, 20))
        config = TAEHVConfig(latent_channels=stored["decoder.1.weight"].shape[1], widths=widths,
                             patch_size=round((stored["decoder.22.weight"].shape[0] // 3) ** 0.5))
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise WanError(f"{path} is not a TAEHV decoder's weights ({error})") from None
    model = TAEHVDecoder(config)
    expected = dict(tree_flatten(model.parameters()))
    weights = {}
    for name, shape in ((name, value.shape) for name, value in expected.items()):
        if name not in stored:
            raise WanError(f"{path} lacks {name}: it is not TAEW2.2's layout")
        value = stored[name]
        if value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)  # (out, in, kh, kw) -> MLX's (out, kh, kw, in)
        if value.shape[0] > shape[0] and name.endswith(".conv.weight"):
            value = value[-shape[0]:]  # taehv.py's patch_tgrow_layers: a wider TGrow keeps its last channels
        if value.shape != shape:
            raise WanError(f"{path}: {name} has shape {value.shape}, TAEW2.2's is {shape}")
        weights[name] = mx.array(np.ascontiguousarray(value)).astype(dtype)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model
