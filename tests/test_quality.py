"""BRISQUE (PyPI and piq), CLIP-IQA, LIQE's absence and LPIPS.

Real piq / torchvision weights cannot be downloaded here: value tests that need them skip with the reason. The
plumbing tests use RANDOM weights of the same architecture (keys and shapes of the real files), written into a
temporary BENCH_WEIGHTS_DIR; the numbers they give mean nothing, only how the code handles them is checked.
"""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import save_file

from bench import weights
from bench.leaderboard import leaderboard_frame
from bench.plugins import METRICS, MetricInputs
from bench.registry import ConfigError, build_params
from metrics import quality
from metrics.imperceptibility import (LPIPS_BACKBONES, TORCHVISION_BACKBONES, Lpips, lpips_input, lpips_linear_file,
                                      lpips_model)
from metrics.quality import (PIQ_BRISQUE_SVM, PIQ_CLIPIQA, Brisque, BrisquePiq, ClipIqa, Liqe, brisque_model,
                             resized_batch, score_generated)

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def make(cls, **params):
    return cls(build_params(cls, params, None, f"metric {cls.__name__}"))


def face() -> np.ndarray:
    """A real 512x512 face (shared data), else scikit-image's astronaut (also a real photo)."""
    files = sorted((FACES / "n000050" / "set_A").glob("*.png")) if FACES.is_dir() else []
    if files:
        with PILImage.open(files[0]) as im:
            return np.asarray(im.convert("RGB"))
    from skimage import data

    return data.astronaut()


def noised(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image.astype(np.float64) + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def generated(*images: np.ndarray) -> MetricInputs:
    inputs = MetricInputs(subject=None, resolution=images[0].shape[0])  # type: ignore[arg-type]
    inputs.generated = list(images)
    return inputs


def pairs(protected: list[np.ndarray], clean: list[np.ndarray]) -> MetricInputs:
    inputs = MetricInputs(subject=None, resolution=clean[0].shape[0])  # type: ignore[arg-type]
    inputs.protected, inputs.clean = list(protected), list(clean)
    return inputs


def real_weights_or_skip(w: weights.Weights) -> None:
    reason = w.missing()
    if reason:
        pytest.skip(f"real weights needed for values: {reason}")


# --- random weights of the real architectures (RANDOM: numbers are meaningless) -------------------------------

def random_brisque_svm(root: Path) -> None:
    """774 support vectors x 36 BRISQUE features, the size of piq's ~112 KB file."""
    g = torch.Generator().manual_seed(0)
    folder = root / PIQ_BRISQUE_SVM.name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"sv_coef": torch.randn(774, generator=g), "sv": torch.rand(774, 36, generator=g) * 2 - 1},
              str(folder / quality.BRISQUE_SVM_FILE))


def random_clip_rn50(root: Path) -> None:
    """OpenAI CLIP RN50's state dict keys/shapes (piq's CLIP class, built on the meta device), random float16."""
    from piq.feature_extractors import clip

    with torch.device("meta"):
        shapes = clip.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, t in shapes.items():
        if not t.dtype.is_floating_point:
            state[k] = torch.zeros(t.shape, dtype=t.dtype)
        elif k.endswith("running_var"):
            state[k] = torch.ones(t.shape, dtype=torch.float16)
        else:
            state[k] = (torch.randn(t.shape, generator=g) * 0.02).half()
    folder = root / PIQ_CLIPIQA.name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / quality.CLIP_RN50_FILE))
    tokens = torch.zeros(2, 77, dtype=torch.int64)
    tokens[:, 0], tokens[:, 1], tokens[:, 2], tokens[:, 3] = 49406, torch.tensor([1, 2]), 269, 49407
    save_file({"tokens": tokens}, str(folder / quality.CLIPIQA_TOKENS_FILE))


def random_trunk(root: Path, net: str) -> None:
    """torchvision's own randomly initialised AlexNet / VGG16 ``features``, under the real file's name."""
    import torchvision

    torch.manual_seed(0)
    features = (torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16)(weights=None).features
    w = LPIPS_BACKBONES[net]
    (root / w.name).mkdir(parents=True, exist_ok=True)
    save_file({f"features.{k}": v for k, v in features.state_dict().items()}, str(root / w.name / w.files[0]))


@pytest.fixture(scope="session")
def random_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("random-weights")
    random_brisque_svm(root)
    random_trunk(root, "alex")
    random_trunk(root, "vgg")
    return root


@pytest.fixture
def random_weights(random_root: Path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(random_root))
    return random_root


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    return tmp_path


# --- BRISQUE, PyPI package ------------------------------------------------------------------------------------

def test_pypi_brisque_is_the_package_score_and_rises_with_noise():
    img = face()
    expected = float(brisque_model().score(PILImage.fromarray(img)))
    clean = make(Brisque).compute(generated(img))
    assert abs(clean - expected) < 1e-6
    assert make(Brisque).compute(generated(noised(img, 25))) > clean + 5


# --- BRISQUE, piq (MetaCloak) ---------------------------------------------------------------------------------

def test_two_brisque_protocols_never_share_a_column():
    pypi, piq = make(Brisque), make(BrisquePiq)
    assert pypi.protocol_id() == "brisque/pypi-brisque/native"
    assert piq.protocol_id() == "brisque/piq0.8/resize256" != pypi.protocol_id()
    assert BrisquePiq.higher_is_better and Brisque.higher_is_better and "MetaCloak" in BrisquePiq.paper
    cell = {"dataset": "d", "defense": "x", "scenario": "s", "attack": "a", "status": "ok", "provenance": {},
            "metrics": {pypi.protocol_id(): 30.0, piq.protocol_id(): -5.0}}
    frame = leaderboard_frame([cell])
    assert frame[pypi.protocol_id()].iloc[0] == 30.0 and frame[piq.protocol_id()].iloc[0] == -5.0
    assert make(BrisquePiq, size=128).protocol_id() == "brisque/piq0.8/resize128"
    with pytest.raises(ConfigError, match="size"):
        make(BrisquePiq, size=16)


def test_resize_is_torchvisions_resize_256_to_tensor():
    from torchvision import transforms

    img = face()
    reference = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor()])(PILImage.fromarray(img))
    ours = resized_batch([img], 256)
    assert ours.shape == (1, 3, 256, 256) and ours.dtype == torch.float32
    assert torch.equal(ours[0], reference)


def test_piq_urls_are_the_ones_piq_downloads():
    import importlib

    from piq.feature_extractors import clip

    svr_source = inspect.getsource(importlib.import_module("piq.brisque")._score_svr).replace("' \\\n          '", "")
    assert quality.PIQ_BRISQUE_URL in svr_source
    assert clip.PIQ_CLIP_MODEL_PATH == quality.PIQ_CLIP_URL and clip.OPENIQA_CLIP_MODEL_PATH == quality.OPENAI_CLIP_URL
    assert importlib.import_module("piq.clip_iqa").TOKENS_URL == quality.PIQ_CLIPIQA_TOKENS_URL


def test_brisque_piq_with_random_svm_resizes_to_256_and_is_repeatable(random_weights, monkeypatch):
    """RANDOM SVR: piq's features are real, the score is not."""
    seen: list[tuple[int, ...]] = []
    real = quality.piq_brisque
    monkeypatch.setattr(quality, "piq_brisque", lambda b, f: (seen.append(tuple(b.shape)), real(b, f))[1])
    img = face()
    metric = make(BrisquePiq)
    first = metric.compute(generated(img))
    assert seen == [(1, 3, 256, 256)] and np.isfinite(first)
    assert metric.compute(generated(img)) == first  # piq transposes the support vectors in place: given a copy
    small = np.asarray(PILImage.fromarray(img).resize((256, 256), PILImage.Resampling.BILINEAR))
    assert metric.compute(generated(small)) == first  # a 256x256 input is not resized again
    other = noised(img, 20)
    both = metric.compute(generated(img, other))
    assert seen[-1] == (2, 3, 256, 256)
    assert abs(both - (first + metric.compute(generated(other))) / 2) < 1e-3  # batched = one by one


def test_brisque_piq_is_metacloaks_code_path(random_weights, tmp_path, monkeypatch):
    """MetaCloak's own lines (``BRISQUELoss()(ToTensor(Resize((256, 256))(img)))``, piq reading the SVR from torch
    hub's cache, as on a machine that downloaded it) against the metric, both with the same RANDOM SVR."""
    import piq
    from torchvision import transforms

    svm = weights.load_safetensors(PIQ_BRISQUE_SVM.path() / quality.BRISQUE_SVM_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save((svm["sv_coef"], svm["sv"]), tmp_path / "hub" / "checkpoints" / "brisque_svm_weights.pt")
    img = face()
    trans = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor()])
    with torch.no_grad():
        theirs = piq.BRISQUELoss()(trans(PILImage.fromarray(img)).unsqueeze(0)).item()
    assert abs(make(BrisquePiq).compute(generated(img)) - theirs) < 1e-4


def test_nonfinite_scores_are_dropped_as_metacloak_does():
    img = face()[:40, :40]
    assert score_generated(generated(img, img), "m", 32, lambda b: torch.tensor([float("nan"), 2.0])) == 2.0
    with pytest.raises(ValueError, match="NaN or inf"):
        score_generated(generated(img), "m", 32, lambda b: torch.tensor([float("inf")]))


def test_brisque_piq_names_a_degenerate_image(random_weights):
    inputs = generated(face(), np.full((64, 64, 3), 128, np.uint8))
    inputs.generated_names = ["a.png", "flat.png"]
    with pytest.raises(ValueError, match=r"image 1 \(flat.png\)"):
        make(BrisquePiq).compute(inputs)


def test_brisque_piq_real_weights_other_scale_than_pypi():
    real_weights_or_skip(PIQ_BRISQUE_SVM)
    img = face()
    piq_clean = make(BrisquePiq).compute(generated(img))
    assert make(BrisquePiq).compute(generated(noised(img, 25))) > piq_clean
    assert abs(piq_clean - make(Brisque).compute(generated(img))) > 0.5


# --- CLIP-IQA (MetaCloak) -------------------------------------------------------------------------------------

def test_clipiqa_random_rn50_runs_through_piq(tmp_path, monkeypatch):
    """RANDOM CLIP RN50 weights and tokens: the value means nothing; piq's CLIPIQA is built and run from our files."""
    random_clip_rn50(tmp_path)
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    metric = make(ClipIqa)
    assert metric.protocol_id() == "clipiqa/piq0.8-rn50/resize224" and not ClipIqa.higher_is_better
    img = face()
    both = metric.compute(generated(img, noised(img, 30)))
    one = metric.compute(generated(img))
    assert 0.0 <= one <= 1.0 and 0.0 <= both <= 1.0
    model = quality.clipiqa_model(str(PIQ_CLIPIQA.path()))
    assert model is quality.clipiqa_model(str(PIQ_CLIPIQA.path()))  # built once per process
    assert not any(p.dtype != torch.float32 for p in model.parameters())
    stored = weights.load_safetensors(PIQ_CLIPIQA.path() / quality.CLIP_RN50_FILE)["visual.conv1.weight"]
    assert torch.equal(model.feature_extractor.visual.conv1.weight, stored.float())


def test_clipiqa_real_weights_prefers_the_clean_face():
    real_weights_or_skip(PIQ_CLIPIQA)
    img = face()
    clean = make(ClipIqa).compute(generated(img))
    assert 0.0 < clean < 1.0 and make(ClipIqa).compute(generated(noised(img, 40))) < clean


# --- LIQE -----------------------------------------------------------------------------------------------------

def test_liqe_is_listed_as_unavailable_with_the_reason(capsys, tmp_path):
    from bench.cli import main

    assert main(["list", "metrics"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("liqe "))
    assert "[unavailable: not provided: LIQE" in line and "pyiqa" in line
    assert METRICS.get("liqe") is Liqe and make(Liqe).missing_weights() == quality.LIQE_REASON
    with pytest.raises(RuntimeError, match="pyiqa"):
        make(Liqe).compute(generated(face()))


# --- missing weights ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, params, name", [
    (BrisquePiq, {}, "piq-brisque-svm"), (ClipIqa, {}, "piq-clipiqa"),
    (Lpips, {}, "torchvision-alexnet"), (Lpips, {"net": "vgg"}, "torchvision-vgg16")])
def test_missing_weights_say_how_to_fetch(no_weights, cls, params, name):
    metric = make(cls, **params)
    assert metric.weight_names() == (name,)
    reason = metric.missing_weights()
    assert reason and f"bench weights fetch {name}" in reason and str(no_weights) in reason
    assert cls.unavailable_reason() == make(cls).missing_weights()
    img = face()[:64, :64]
    inputs = pairs([img], [img]) if cls is Lpips else generated(img)
    with pytest.raises(weights.WeightsUnavailable, match=f"bench weights fetch {name}"):
        metric.compute(inputs)


# --- fetchers (upstream files faked locally: the conversion is what is tested) -----------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fetchers_leave_only_safetensors(tmp_path, monkeypatch):
    up = tmp_path / "upstream"
    up.mkdir()
    torch.save((torch.randn(5), torch.randn(5, 36)), up / "svm.pt")
    torch.save({"features.0.weight": torch.randn(2, 3, 1, 1), "classifier.1.weight": torch.randn(2, 2)}, up / "a.pth")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(up / "rn50.pt"))  # a TorchScript archive, as RN50.pt is
    torch.save(torch.tensor([[49406, 1, 49407]]), up / "tokens.pt")
    sources = {quality.PIQ_BRISQUE_URL: "svm.pt", TORCHVISION_BACKBONES["alex"][0]: "a.pth",
               quality.PIQ_CLIP_URL: "rn50.pt", quality.PIQ_CLIPIQA_TOKENS_URL: "tokens.pt"}
    monkeypatch.setattr(weights, "download", lambda url, dest: Path(shutil.copy(up / sources[url], dest)))
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "w"))
    for w in (PIQ_BRISQUE_SVM, LPIPS_BACKBONES["alex"], PIQ_CLIPIQA):
        folder = w.fetch()
        assert w.missing() is None and sorted(p.name for p in folder.iterdir()) == sorted(w.files)
    assert set(weights.load_safetensors(PIQ_BRISQUE_SVM.path() / quality.BRISQUE_SVM_FILE)) == {"sv_coef", "sv"}
    trunk = LPIPS_BACKBONES["alex"]
    assert set(weights.load_safetensors(trunk.path() / trunk.files[0])) == {"features.0.weight"}
    assert set(weights.load_safetensors(PIQ_CLIPIQA.path() / quality.CLIP_RN50_FILE)) == {"weight", "bias"}


def test_clip_fallback_download_is_hash_checked(tmp_path, monkeypatch):
    from urllib.error import URLError

    def download(url: str, dest: Path) -> Path:
        if url == quality.PIQ_CLIP_URL:
            raise URLError("offline")
        dest.write_bytes(b"not RN50")
        return dest

    monkeypatch.setattr(weights, "download", download)
    with pytest.raises(weights.WeightsUnavailable, match="SHA256"):
        quality._download_clip_rn50(tmp_path / "RN50.pt")


# --- LPIPS ----------------------------------------------------------------------------------------------------

def test_lpips_ids_directions_and_params():
    assert make(Lpips).protocol_id() == "lpips/alex-v0.1/protected-vs-clean"
    assert make(Lpips, net="vgg").protocol_id() == "lpips/vgg-v0.1/protected-vs-clean"
    assert Lpips.target == "protected" and not Lpips.higher_is_better and METRICS.get("lpips") is Lpips
    with pytest.raises(ConfigError, match="net"):
        make(Lpips, net="squeeze")


def test_lpips_model_has_the_package_linear_layers_and_our_trunk(random_weights):
    w = LPIPS_BACKBONES["alex"]
    model = lpips_model("alex", str(w.path() / w.files[0]))
    lins = torch.load(lpips_linear_file("alex"), map_location="cpu", weights_only=True)
    assert torch.equal(model.lin3.model[1].weight, lins["lin3.model.1.weight"])
    trunk = weights.load_safetensors(w.path() / w.files[0])
    assert torch.equal(model.net.state_dict()["slice3.6.weight"], trunk["features.6.weight"]) and not model.training


def test_lpips_equals_lpips_own_model_and_input_scaling(random_weights):
    """Against lpips's own construction (``pretrained=True``: the package loads its linear layers) with the same
    RANDOM trunk, fed by ``lpips.im2tensor``: same linear layers, same [-1, 1] scaling, same trunk mapping."""
    import lpips
    import torchvision

    clean = face()[::4, ::4].copy()
    prot = noised(clean, 8, 2)
    assert torch.equal(lpips_input([clean]), lpips.im2tensor(clean).float())
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    tv = torchvision.models.alexnet(weights=None)
    w = LPIPS_BACKBONES["alex"]
    tv.features.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.load_safetensors(
        w.path() / w.files[0]).items()})
    for k, module in enumerate((ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5)):
        for name, layer in module.named_children():
            layer.load_state_dict(tv.features[int(name)].state_dict())
    with torch.no_grad():
        expected = ref(lpips.im2tensor(prot), lpips.im2tensor(clean)).item()
    assert abs(make(Lpips).compute(pairs([prot], [clean])) - expected) < 1e-6


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_random_trunk_zero_for_identical_and_grows_with_noise(random_weights, net):
    """RANDOM trunk (package linear layers): 0 exactly for identical pairs; more noise, larger distance."""
    clean = face()[::4, ::4].copy() if net == "alex" else face()[::8, ::8].copy()  # 128 / 64 px: cheap
    metric = make(Lpips, net=net)
    assert metric.compute(pairs([clean, clean], [clean, clean])) == 0.0
    small, big = noised(clean, 2, 1), noised(clean, 16, 1)
    d_small, d_big = metric.compute(pairs([small], [clean])), metric.compute(pairs([big], [clean]))
    assert 0.0 < d_small < d_big
    assert abs(metric.compute(pairs([small, big], [clean, clean])) - (d_small + d_big) / 2) < 1e-6


def test_lpips_rejects_mismatched_pairs(random_weights):
    with pytest.raises(ValueError, match="shape"):
        make(Lpips).compute(pairs([np.zeros((32, 32, 3), np.uint8)], [np.zeros((32, 16, 3), np.uint8)]))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_real_weights_in_the_published_range(net):
    real_weights_or_skip(LPIPS_BACKBONES[net])
    clean = face()
    d8 = make(Lpips, net=net).compute(pairs([noised(clean, 8)], [clean]))
    d32 = make(Lpips, net=net).compute(pairs([noised(clean, 32)], [clean]))
    assert 0.0 < d8 < d32 < 1.0
