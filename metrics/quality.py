"""No-reference image quality of generated images: two BRISQUE protocols, CLIP-IQA, and why LIQE is absent.

- ``brisque`` (Anti-DreamBooth ``evaluations/brisques.py``, APDM): the PyPI ``brisque`` package,
  ``BRISQUE(url=False).score(PIL.Image)`` at native resolution, mean over images; roughly 0-100.
- ``brisque-piq`` (MetaCloak ``robust_facecloak/eval_score.py``): ``piq.BRISQUELoss()`` (data_range=1) on
  ``Resize((256, 256))`` + ``ToTensor()``, i.e. PIL bilinear to 256x256, then /255. Another SVM and another scale
  (negative values occur): never comparable with ``brisque`` (Mittal et al., TIP'12, for both).
- ``clipiqa`` (MetaCloak): ``piq.CLIPIQA()`` (data_range=1, OpenAI CLIP RN50, "Good photo."/"Bad photo." anchors;
  Wang et al., AAAI'23) on ``Resize((224, 224))`` + ``ToTensor()``; in [0, 1].
- ``liqe``: registered only to say why it is unavailable (LIQE_REASON).

MetaCloak drops NaN/inf per-image scores before the mean; so do ``brisque-piq`` and ``clipiqa``.

piq downloads its weights at first use; here they come from ``bench.weights`` entries (safetensors, fetched with
``bench weights fetch piq-brisque-svm`` / ``piq-clipiqa``) and are handed to piq's own code by replacing its two
loaders (``piq.brisque.load_url``; ``piq.feature_extractors.clip.load`` and ``piq.clip_iqa.download_tensor``)
while piq runs: piq has no hook for local weights, and everything else (features, SVR, CLIP forward) stays piq's.

``higher_is_better`` is from the defender's point of view: a defense wants the personalised model's images to look
bad, so a higher BRISQUE (worse) is better for the defender and a higher CLIP-IQA / LIQE (better) is worse.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import math
import threading
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest import mock

import numpy as np
from PIL import Image as PILImage

from bench import weights
from bench.images import checked_rgb
from bench.plugins import METRICS, Image, Metric, MetricInputs, NotProvided
from bench.registry import Requirements

PIQ_VERSION = "0.8"  # the protocol ids name it; other piq versions may change values
CHUNK = 16  # images per forward pass

PIQ_BRISQUE_URL = "https://github.com/photosynthesis-team/piq/releases/download/v0.4.0/brisque_svm_weights.pt"
PIQ_CLIP_URL = "https://github.com/photosynthesis-team/piq/releases/download/v0.7.1/RN50.pt"
OPENAI_CLIP_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
OPENAI_CLIP_URL = f"https://openaipublic.azureedge.net/clip/models/{OPENAI_CLIP_SHA256}/RN50.pt"
PIQ_CLIPIQA_TOKENS_URL = "https://github.com/photosynthesis-team/piq/releases/download/v0.7.1/clipiqa_tokens.pt"

BRISQUE_SVM_FILE = "brisque_svm_weights.safetensors"  # {"sv_coef": (n_sv,), "sv": (n_sv, 36)}
CLIP_RN50_FILE = "clip_rn50.safetensors"  # OpenAI CLIP RN50 state dict, as stored (float16)
CLIPIQA_TOKENS_FILE = "clipiqa_tokens.safetensors"  # {"tokens": (2, 77) int}: "Good photo.", "Bad photo."

LIQE_REASON = ("not provided: LIQE (Zhang et al., CVPR'23), which MetaCloak reports, exists only in pyiqa, which this "
               "harness does not depend on (about 1.2 GB installed; its LIQE checkpoint downloads at first use and "
               "almost nothing in it works offline). MetaCloak's other quality metrics are here: clipiqa, brisque-piq")


# ---------------------------------------------------------------- weights

def _load_tensors_pickle(src: Path) -> Any:
    """An upstream pickled tensor file read with ``weights_only=True`` (tensors only, no code); fetch time only."""
    import torch

    return torch.load(src, map_location="cpu", weights_only=True)


def _save(tensors: dict, dest: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest))


def fetch_brisque_svm(folder: Path) -> None:
    """piq's BRISQUE SVR (a pickled ``(sv_coef, sv)`` pair) -> ``BRISQUE_SVM_FILE``."""
    src = weights.download(PIQ_BRISQUE_URL, folder / "brisque_svm_weights.pt")
    pair = _load_tensors_pickle(src)
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise weights.WeightsUnavailable(f"{PIQ_BRISQUE_URL}: expected a (sv_coef, sv) pair, got {type(pair)}")
    _save({"sv_coef": pair[0], "sv": pair[1]}, folder / BRISQUE_SVM_FILE)
    src.unlink()


def _download_clip_rn50(dest: Path) -> Path:
    """piq's snapshot of OpenAI's RN50, else OpenAI's own file (sha256-checked), as piq's ``clip.load`` does."""
    from urllib.error import URLError

    try:
        return weights.download(PIQ_CLIP_URL, dest)
    except URLError:
        weights.download(OPENAI_CLIP_URL, dest)
        if hashlib.sha256(dest.read_bytes()).hexdigest() != OPENAI_CLIP_SHA256:
            raise weights.WeightsUnavailable(f"{OPENAI_CLIP_URL}: SHA256 mismatch") from None
        return dest


def fetch_clipiqa(folder: Path) -> None:
    """CLIP RN50 (a TorchScript archive: read with ``torch.jit.load``, which builds tensors and TorchScript code but
    runs none of it) and piq's pre-tokenised anchor prompts -> safetensors."""
    import torch

    src = _download_clip_rn50(folder / "RN50.pt")
    with warnings.catch_warnings():  # torch >= 2.14 marks torch.jit deprecated
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(src), map_location="cpu").state_dict()
    _save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, folder / CLIP_RN50_FILE)
    tok = weights.download(PIQ_CLIPIQA_TOKENS_URL, folder / "clipiqa_tokens.pt")
    _save({"tokens": _load_tensors_pickle(tok)}, folder / CLIPIQA_TOKENS_FILE)
    src.unlink()
    tok.unlink()


PIQ_BRISQUE_SVM = weights.register(weights.Weights(
    name="piq-brisque-svm",
    what="piq's BRISQUE SVR (support vectors + coefficients of the LIVE MATLAB BRISQUE model)",
    used_by="brisque-piq", files=(BRISQUE_SVM_FILE,), source=PIQ_BRISQUE_URL, fetcher=fetch_brisque_svm,
    license="Apache-2.0 (piq); model from LIVE's BRISQUE release (citation requested)"))
PIQ_CLIPIQA = weights.register(weights.Weights(
    name="piq-clipiqa",
    what="OpenAI CLIP RN50 (piq's snapshot) + piq's CLIP-IQA anchor tokens ('Good photo.', 'Bad photo.')",
    used_by="clipiqa", files=(CLIP_RN50_FILE, CLIPIQA_TOKENS_FILE),
    source=f"{PIQ_CLIP_URL} (fallback {OPENAI_CLIP_URL}) and {PIQ_CLIPIQA_TOKENS_URL}", fetcher=fetch_clipiqa,
    license="MIT (OpenAI CLIP), Apache-2.0 (piq)"))


# ---------------------------------------------------------------- shared helpers

def check_piq() -> None:
    import piq

    if not piq.__version__.startswith(PIQ_VERSION + "."):
        raise RuntimeError(f"this protocol pins piq {PIQ_VERSION}.x, found piq {piq.__version__} "
                           f"(pip install 'piq>={PIQ_VERSION},<0.9')")


def resized_batch(images: Sequence[Image], size: int):
    """torchvision ``Resize((size, size))`` on a PIL image (PIL bilinear) + ``ToTensor()``: (N, 3, size, size) float32
    in [0, 1]."""
    import torch

    arrays = []
    for i, image in enumerate(images):
        pil = PILImage.fromarray(checked_rgb(image, f"image {i}")).resize((size, size), PILImage.Resampling.BILINEAR)
        arrays.append(np.asarray(pil))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch.float().div(255)


def _name(inputs: MetricInputs, i: int) -> str:
    name = inputs.generated_names[i] if i < len(inputs.generated_names) else ""
    return f"{i} ({name})" if name else str(i)


def score_generated(inputs: MetricInputs, metric: str, size: int, score: Callable[[Any], Any]) -> float:
    """Resize, score in chunks of ``CHUNK``, drop NaN/inf (MetaCloak's filter), mean. A chunk that piq refuses (an
    AssertionError, e.g. a constant image) is rescored image by image to name the culprit."""
    import torch

    if not inputs.generated:
        raise ValueError(f"{metric}: no generated images given (MetricInputs.generated is empty)")
    values: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(inputs.generated), CHUNK):
            batch = resized_batch(inputs.generated[start:start + CHUNK], size)
            try:
                values += [float(v) for v in score(batch).reshape(-1)]
            except AssertionError:
                for j in range(len(batch)):
                    try:
                        score(batch[j:j + 1])
                    except AssertionError as e:
                        raise ValueError(f"{metric}: piq refuses generated image {_name(inputs, start + j)}: {e} "
                                         f"(constant or degenerate image?)") from None
                raise
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        raise ValueError(f"{metric}: every one of the {len(values)} generated images scored NaN or inf")
    return float(np.mean(finite))


@dataclass(frozen=True)
class NoTunables:
    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class ResizeParams:
    size: int = 256  # square side the images are resized to before scoring

    def validate(self) -> None:
        if not 32 <= self.size <= 4096:
            raise ValueError(f"size must be in [32, 4096], got {self.size}")


# ---------------------------------------------------------------- BRISQUE, PyPI brisque (Anti-DreamBooth, APDM)

@functools.lru_cache(maxsize=1)
def brisque_model() -> Any:
    """The ``brisque`` package's SVM model, loaded once per process."""
    from brisque import BRISQUE

    return BRISQUE(url=False)


def brisque_score(image: Image) -> float:
    """BRISQUE score of one uint8 HxWx3 RGB image, exactly ``BRISQUE(url=False).score(PIL image)``."""
    return float(brisque_model().score(PILImage.fromarray(checked_rgb(image, "brisque"))))


@METRICS.register("brisque", version=1)
class Brisque(Metric):
    """Mean BRISQUE over the generated images (PyPI ``brisque`` 0.2, native resolution). An image whose score is
    NaN (e.g. a constant image) raises ValueError naming its index rather than being averaged."""

    Params = NoTunables
    target = "generated"
    higher_is_better = True
    description = ("BRISQUE (PyPI brisque, native resolution) of generated images, mean; lower = better image "
                   "quality, so higher is better for the defender")
    requires = Requirements(modules=("brisque",))
    paper = "Anti-DreamBooth (Le et al., ICCV'23) evaluations/brisques.py; APDM"

    def protocol_id(self) -> str:
        return "brisque/pypi-brisque/native"

    def compute(self, inputs: MetricInputs) -> float:
        if not inputs.generated:
            raise ValueError("brisque: no generated images given (MetricInputs.generated is empty)")
        scores = []
        for i, image in enumerate(inputs.generated):
            s = brisque_score(image)
            if math.isnan(s):
                name = inputs.generated_names[i] if i < len(inputs.generated_names) else ""
                raise ValueError(f"brisque: generated image {i}{f' ({name})' if name else ''} gives NaN "
                                 f"(constant or degenerate image?)")
            scores.append(s)
        return float(np.mean(scores))


# ---------------------------------------------------------------- BRISQUE, piq (MetaCloak)

_PATCH_LOCK = threading.Lock()  # piq's loaders are replaced module-wide while piq runs


@functools.lru_cache(maxsize=2)
def brisque_svm(path: str) -> tuple[Any, Any]:
    """(sv_coef, sv) from our safetensors file, loaded once per process and file."""
    state = weights.load_safetensors(Path(path))
    return state["sv_coef"].float(), state["sv"].float()


def piq_brisque(batch: Any, svm_file: Path) -> Any:
    """``piq.BRISQUELoss(reduction="none")`` (MetaCloak's defaults otherwise: data_range=1, kernel 7, sigma 7/6) on an
    (N, 3, H, W) batch in [0, 1], with the SVR read from ``svm_file`` instead of piq's download."""
    import piq

    piq_brisque_module = importlib.import_module("piq.brisque")  # `piq.brisque` the attribute is the function
    check_piq()
    sv_coef, sv = brisque_svm(str(svm_file))

    def local_svm(url: str, map_location: Any = None, **_: Any) -> tuple[Any, Any]:
        if url != PIQ_BRISQUE_URL:
            raise RuntimeError(f"piq asks for BRISQUE weights {url}, "
                               f"but {PIQ_BRISQUE_SVM.name} holds {PIQ_BRISQUE_URL}")
        return sv_coef.clone(), sv.clone()  # piq transposes sv in place

    with _PATCH_LOCK, mock.patch.object(piq_brisque_module, "load_url", local_svm):
        return piq.BRISQUELoss(reduction="none")(batch)


@METRICS.register("brisque-piq", version=1)
class BrisquePiq(Metric):
    """Mean piq 0.8 BRISQUE over the generated images resized to 256x256 (MetaCloak), NaN/inf scores dropped.
    Not the scale of ``brisque``: a separate column."""

    Params = ResizeParams
    target = "generated"
    higher_is_better = True
    description = ("BRISQUE (piq 0.8 BRISQUELoss, data_range=1) of generated images resized to 256x256, mean; "
                   "lower = better image quality, so higher is better for the defender (MetaCloak)")
    requires = Requirements(modules=("piq", "torchvision"), extra="metrics", weights=(PIQ_BRISQUE_SVM.name,))
    paper = "MetaCloak (Liu et al., CVPR'24) robust_facecloak/eval_score.py; BRISQUE (Mittal et al., TIP'12)"

    def protocol_id(self) -> str:
        return f"brisque/piq{PIQ_VERSION}/resize{self.params.size}"

    def compute(self, inputs: MetricInputs) -> float:
        svm_file = PIQ_BRISQUE_SVM.path() / BRISQUE_SVM_FILE
        return score_generated(inputs, "brisque-piq", self.params.size, lambda b: piq_brisque(b, svm_file))


# ---------------------------------------------------------------- CLIP-IQA, piq (MetaCloak)

@functools.lru_cache(maxsize=2)
def clipiqa_model(folder: str) -> Any:
    """``piq.CLIPIQA(data_range=1)`` built by piq's own ``__init__`` from our files, once per process and folder:
    ``clip.load`` becomes what it does after its download (``build_model(state).float()``) and
    ``download_tensor`` returns the stored tokens."""
    from piq.feature_extractors import clip

    piq_clip_iqa = importlib.import_module("piq.clip_iqa")
    check_piq()
    state = weights.load_safetensors(Path(folder) / CLIP_RN50_FILE)
    tokens = weights.load_safetensors(Path(folder) / CLIPIQA_TOKENS_FILE)["tokens"]
    backbone = clip.build_model(state).float()

    def local_tokens(url: str, root: str, map_location: str = "cpu") -> Any:
        if url != PIQ_CLIPIQA_TOKENS_URL:
            raise RuntimeError(f"piq asks for CLIP-IQA tokens {url}, "
                               f"but {PIQ_CLIPIQA.name} holds {PIQ_CLIPIQA_TOKENS_URL}")
        return tokens.clone()

    with _PATCH_LOCK, ExitStack() as stack:
        stack.enter_context(mock.patch.object(clip, "load", lambda: backbone))
        stack.enter_context(mock.patch.object(piq_clip_iqa, "download_tensor", local_tokens))
        model = piq_clip_iqa.CLIPIQA(data_range=1.0)
    return model.eval()


@dataclass(frozen=True)
class ClipIqaParams(ResizeParams):
    size: int = 224


@METRICS.register("clipiqa", version=1)
class ClipIqa(Metric):
    """Mean piq 0.8 CLIP-IQA (CLIP RN50, "Good photo." vs "Bad photo.") over the generated images resized to
    224x224 (MetaCloak), in [0, 1]; NaN/inf dropped."""

    Params = ClipIqaParams
    target = "generated"
    higher_is_better = False
    description = ("CLIP-IQA (piq 0.8, CLIP RN50, good/bad photo anchors) of generated images resized to 224x224, "
                   "mean in [0, 1]; higher = better-looking, so lower is better for the defender (MetaCloak)")
    requires = Requirements(modules=("piq", "torchvision"), extra="metrics", weights=(PIQ_CLIPIQA.name,))
    paper = "MetaCloak (Liu et al., CVPR'24) robust_facecloak/eval_score.py; CLIP-IQA (Wang et al., AAAI'23)"

    def protocol_id(self) -> str:
        return f"clipiqa/piq{PIQ_VERSION}-rn50/resize{self.params.size}"

    def compute(self, inputs: MetricInputs) -> float:
        model = clipiqa_model(str(PIQ_CLIPIQA.path()))
        return score_generated(inputs, "clipiqa", self.params.size, model)


# ---------------------------------------------------------------- LIQE: not available

@METRICS.register("liqe", version=1)
class Liqe(NotProvided):
    """LIQE quality (MetaCloak): not available in this harness; ``bench list`` says why (LIQE_REASON)."""

    higher_is_better = False
    description = "LIQE quality (MetaCloak): not provided, see the unavailable reason"
    paper = "MetaCloak (Liu et al., CVPR'24) eval_score.py; LIQE (Zhang et al., CVPR'23)"
    reason = LIQE_REASON
    pid = "liqe/pyiqa/not-provided"
