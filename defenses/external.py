"""Protections made elsewhere, run through every scenario, attack and metric like the built-in ones.

- ``external`` (perturb): each subject's published set_B read from a folder the user gives (a paper's released
  protected images, a tool we do not implement such as Glaze or a web service). Per set_B image the file of the same
  stem in ``<folder>/<subject id>/set_B/`` or ``<folder>/<subject id>/``; it must have its clean original's size. The
  realised L-inf distance to the clean original at native resolution is recorded (``external_linf_255``), and a
  declared budget ``eps`` (/255 pixel units) is enforced there. The images then go through the profile's resize as
  the clean ones do (``_resized``).
- ``external-model`` (harden): a hardened model made elsewhere (a diffusers folder or a Hugging Face id, safetensors
  only unless --allow-unsafe-weights), used as the attacker's base model.

What the folder or model holds is part of the cache key (``inputs_fingerprint``): replacing the files recomputes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from bench.datasets import IMAGE_SUFFIXES, cached_file_sha256
from bench.images import fit, load_image
from bench.plugins import DEFENSES, Defense, Image, RunContext


@dataclass(frozen=True)
class ExternalParams:
    folder: str  # <folder>/<subject id>/[set_B/]<stem of each set_B image>.png|jpg|jpeg
    eps: float | None = None  # declared L-inf budget (/255 pixel units), enforced at native resolution; None: recorded
    tool: str = ""  # what made the images, for the record (e.g. "Glaze 2.1, intensity high, render quality slowest")

    def validate(self) -> None:
        if not self.folder:
            raise ValueError("folder: give the folder that holds <subject id>/ with the protected images")
        if self.eps is not None and not 0 <= self.eps <= 255:
            raise ValueError(f"eps must be in [0, 255] (/255 pixel units), got {self.eps}")


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


@DEFENSES.register("external", version=1)
class External(Defense):
    """Published images made elsewhere, read from ``folder`` (same layout as the dataset); budget checked, not made."""

    Params = ExternalParams
    user_inputs: ClassVar[bool] = True  # names files of the user's: not part of `defenses: all`

    def _root(self) -> Path:
        root = Path(self.params.folder).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"external: folder {self.params.folder!r} " +
                                    ("is a file" if root.exists() else "does not exist"))
        return root

    def missing_weights(self) -> str | None:
        try:
            self._root()
        except FileNotFoundError as e:
            return str(e)
        return None

    def inputs_fingerprint(self) -> str:
        if self.missing_weights():
            return "missing"  # the suite cannot run here; `missing_weights` says why
        root = self._root()
        h = hashlib.sha256()
        for p in _image_files(root):
            h.update(f"{p.relative_to(root).as_posix()} {cached_file_sha256(p)}\n".encode())
        return h.hexdigest()

    def budget_255(self) -> float | None:
        return None  # enforced at native resolution in protect(), before the profile's resize

    def published_file(self, subject, name: str) -> Path:
        """The published version of set_B image ``name`` of ``subject``; FileNotFoundError naming where it looked."""
        root = self._root()
        stem = Path(name).stem
        places = [root / subject.id / "set_B", root / subject.id]
        for place in places:
            for suffix in IMAGE_SUFFIXES:
                for candidate in (place / f"{stem}{suffix}", place / f"{stem}{suffix.upper()}"):
                    if candidate.is_file():
                        resolved = candidate.resolve()
                        if not resolved.is_relative_to(root):
                            raise ValueError(f"{candidate}: a link out of the external folder {root}")
                        return resolved
        raise FileNotFoundError(f"external: no published version of {subject.key()} set_B image {name!r}: expected "
                                f"{places[0]}/{stem}.png|jpg|jpeg (or in {places[1]}/)")

    def protect(self, ctx: RunContext, images: list[Image], subject, model_dir: Path | None) -> list[Image]:
        names = subject.file_names("B")
        originals = subject.load("B", None)
        out, linf = [], 0
        for name, original, clean in zip(names, originals, images):
            path = self.published_file(subject, name)
            published = load_image(path)
            if published.shape != original.shape:
                raise ValueError(f"{path}: {published.shape[1]}x{published.shape[0]} px, its clean original {name} "
                                 f"{original.shape[1]}x{original.shape[0]} px: publish at the original's size")
            d = int(np.abs(published.astype(np.int16) - original.astype(np.int16)).max())
            if self.params.eps is not None and d > self.params.eps + 1e-9:
                raise ValueError(f"{path}: L-inf distance to its clean original is {d}/255, over the declared budget "
                                 f"eps={self.params.eps:g}/255")
            linf = max(linf, d)
            out.append(published if published.shape == clean.shape else _resized(published, original, clean))
        ctx.extra["external_linf_255"] = linf
        if self.params.tool:
            ctx.extra["external_tool"] = self.params.tool
        return out


def _resized(published: Image, original: Image, clean: Image) -> Image:
    """The published image at the run's resolution: what publishing changed, resized as the clean set is resized,
    added to the clean image the run uses. Equal to resizing the published image when that clean image is the
    resized original (real photos); synthetic subjects render each resolution directly, hence the difference."""
    size = clean.shape[0]
    moved = fit(published, size).astype(np.int16) - fit(original, size).astype(np.int16)
    return np.clip(clean.astype(np.int16) + moved, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ExternalModelParams:
    model: str  # a diffusers folder or a Hugging Face id (in the local cache)
    tool: str = ""  # what hardened it, for the record

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: give a diffusers folder or a Hugging Face id")


@DEFENSES.register("external-model", version=1)
class ExternalModel(Defense):
    """A hardened model made elsewhere (e.g. by a model-level protection we do not implement) as the attacker's base
    model; every subject is attacked on it."""

    Params = ExternalModelParams
    defense_kind = "harden"
    user_inputs: ClassVar[bool] = True

    def model_roles(self) -> tuple[str, ...]:
        return ()  # no surrogate: the model is given

    def _resolved(self) -> Path:
        from bench import models

        return models.resolve_model(self.params.model)

    def missing_weights(self) -> str | None:
        from bench import models

        try:
            self._resolved()
        except models.ModelUnavailable as e:
            return f"external-model: {e}"
        return None

    def inputs_fingerprint(self) -> str:
        """Names, sizes and modification times of the model's files (hashing gigabytes of weights per plan would
        cost more than the check is worth; the weights' sha256 is recorded with the stage)."""
        if self.missing_weights():
            return "missing"  # the suite cannot run here; `missing_weights` says why
        root = self._resolved()
        h = hashlib.sha256(str(root).encode())
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root).as_posix()} {st.st_size} {st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def harden(self, ctx: RunContext, model_dir: Path | None, subjects: list, out_dir: Path) -> None:
        from bench import models

        path = self._resolved()
        models._model_index(path)  # a diffusers folder (ModelUnavailable otherwise)
        models.check_safe(path, ctx.allow_unsafe_weights)  # refuses pickled weights unless allowed
        (ctx.work_dir / "model.json").write_text(json.dumps({"path": str(path), "ref": self.params.model}))
        ctx.extra["weights_sha256"] = models.weight_hashes(path)
        if self.params.tool:
            ctx.extra["external_tool"] = self.params.tool
