"""Pretrained weights that plug-ins need at run time (metric backbones: DINO, CLIP, ArcFace/RetinaFace, LPIPS,
FID's Inception, piq's BRISQUE and CLIP-IQA), where they live here, and how to fetch them.

Nothing is downloaded at run time. A plug-in names the weights it needs (``Requirements.weights`` or
``Plugin.weight_names()``); ``bench list`` reports the missing ones, a suite that uses them is refused before anything
runs, and ``bench weights fetch NAME`` gets them on a machine with internet access. Two kinds:

- ``hf``: a Hugging Face repository (a transformers model), found in the local Hugging Face cache, or a local folder
  given in place of the id. Only ``*.safetensors``, ``*.json`` and ``*.txt`` files are fetched and loaded.
- ``files``: files under ``<weights root>/<name>/`` (``BENCH_WEIGHTS_DIR``, default
  ``~/.cache/antipersonalization-bench/weights``), put there by the entry's own fetcher. Upstream files that are
  pickled (``.pth``) are converted to ``.safetensors`` when fetched (read with ``torch.load(weights_only=True)``), so
  a run never unpickles anything.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HF_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class WeightsUnavailable(RuntimeError):
    """Weights are not on this machine; the message names them, where they were looked for and how to fetch them."""


def weights_root() -> Path:
    return Path(os.environ.get("BENCH_WEIGHTS_DIR") or "~/.cache/antipersonalization-bench/weights").expanduser()


@dataclass(frozen=True)
class Weights:
    name: str
    what: str  # one line: architecture and training data
    used_by: str  # the plug-ins / protocols that need them
    hf_repo: str = ""  # kind "hf": repository id (or a local folder)
    files: tuple[str, ...] = ()  # kind "files": file names expected in the entry's folder
    source: str = ""  # where the fetcher gets them (URL), for the message and `bench weights list`
    fetcher: Callable[[Path], None] | None = None  # kind "files": writes ``files`` into the given folder
    license: str = ""
    builds_locally: bool = False  # kind "files" made here by ``fetcher`` (no download): built on first use

    @property
    def kind(self) -> str:
        return "hf" if self.hf_repo else "files"

    def folder(self) -> Path:
        """Where kind-"files" weights live."""
        return weights_root() / self.name

    def missing(self) -> str | None:
        """None when present here (or built here on first use), else a sentence naming what is missing and the
        command that fetches it."""
        if self.builds_locally:
            return None
        try:
            self.path()
        except WeightsUnavailable as e:
            return str(e)
        return None

    def path(self) -> Path:
        """The folder holding the weights (a HF snapshot or a local folder). Raises WeightsUnavailable."""
        if self.kind == "hf":
            return _hf_snapshot(self.hf_repo, self.name)
        folder = self.folder()
        absent = [f for f in self.files if not (folder / f).is_file()]
        if absent and self.builds_locally:
            return self.fetch()
        if absent:
            raise WeightsUnavailable(
                f"weights {self.name!r} ({self.what}) are not on this machine: missing {', '.join(absent)} in {folder}. "
                f"On a machine with internet access run `bench weights fetch {self.name}` (source: {self.source}) and "
                f"copy {folder} here, or set BENCH_WEIGHTS_DIR to a folder that holds {self.name}/")
        return folder

    def fetch(self) -> Path:
        """Download (and convert) the weights. Needs internet access."""
        if self.kind == "hf":
            local = Path(self.hf_repo).expanduser()
            if local.is_dir():
                return local
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(self.hf_repo, allow_patterns=HF_PATTERNS))
        if self.fetcher is None:
            raise WeightsUnavailable(f"weights {self.name!r} have no fetcher; get them from {self.source}")
        folder = self.folder()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=folder.parent))
        try:
            self.fetcher(tmp)
            absent = [f for f in self.files if not (tmp / f).is_file()]
            if absent:
                raise WeightsUnavailable(f"fetching {self.name!r} did not produce {', '.join(absent)}")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)  # atomic: a half-fetched entry never looks present
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder


def _hf_snapshot(ref: str, name: str) -> Path:
    local = Path(ref).expanduser()
    if local.is_dir():
        if not any(local.rglob("*.safetensors")):
            raise WeightsUnavailable(f"weights {name!r}: folder {local} holds no .safetensors file (pickled weights "
                                     f"are not loaded; convert them with safetensors.torch.save_file)")
        return local.resolve()
    if ref.startswith((".", "/", "~")) or not _HF_ID.match(ref):
        raise WeightsUnavailable(f"weights {name!r}: {ref!r} is neither a folder nor a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download

    allow_download = os.environ.get("BENCH_ALLOW_DOWNLOAD") == "1"
    try:
        path = Path(snapshot_download(ref, local_files_only=not allow_download, allow_patterns=HF_PATTERNS))
    except Exception as e:  # several exception types mean "not cached" / "offline"
        raise WeightsUnavailable(
            f"weights {name!r} (Hugging Face {ref}) are not in the local Hugging Face cache ({type(e).__name__}). "
            f"On a machine with internet access run `bench weights fetch {name}` (or `huggingface-cli download {ref} "
            f"--include \"*.json\" \"*.txt\" \"*.safetensors\"`) and copy the Hugging Face cache here, or pass a "
            f"local folder in place of the id") from None
    if not any(path.rglob("*.safetensors")):
        raise WeightsUnavailable(f"weights {name!r}: the cached snapshot of {ref} at {path} has no .safetensors file")
    return path


WEIGHTS: dict[str, Weights] = {}


def register(w: Weights) -> Weights:
    if w.name in WEIGHTS and WEIGHTS[w.name] != w:
        raise ValueError(f"weights {w.name!r} registered twice")
    WEIGHTS[w.name] = w
    return w


def get(name: str) -> Weights:
    """A registered entry, or an ad-hoc ``hf`` entry for a Hugging Face id / local folder given as a parameter."""
    if name in WEIGHTS:
        return WEIGHTS[name]
    if Path(name).expanduser().is_dir() or _HF_ID.match(name):
        return Weights(name=name, what=f"model {name}", used_by="a plug-in parameter", hf_repo=name)
    from bench.registry import did_you_mean

    raise KeyError(f"unknown weights {name!r}{did_you_mean(name, list(WEIGHTS))}")


def download(url: str, dest: Path) -> Path:
    """Fetch one URL to ``dest`` (used by fetchers; never called at run time)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)
    return dest


def pickle_to_safetensors(src: Path, dest: Path, key: str | None = None) -> Path:
    """Convert an upstream ``.pth`` state dict (read with ``weights_only=True``: tensors only, no code) to
    ``.safetensors``. ``key`` picks a sub-dict (e.g. ``"state_dict"``)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    if key:
        state = state[key]
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest))
    return dest


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
