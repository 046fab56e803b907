"""Model-utility metrics (FID through the `sample` stage) and the two-class watermark metrics.

pytorch-fid's Inception weights cannot be downloaded here: the FID tests build the SAME architecture with random
weights (labelled "random weights": they test the plumbing and FID's algebra, not real FID values)."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.plugins import MetricInputs
from bench.registry import build_params
from bench.weights import WeightsUnavailable
from metrics import utility
from metrics.utility import Fid
from metrics.watermark import WatermarkAccuracy, WatermarkAuc, WatermarkTprAtFpr
from tests.conftest import MICRO, write_suite


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A weights root holding fid-inception with random weights of pytorch-fid's FID InceptionV3."""
    import torch
    from pytorch_fid import inception
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        model = inception.fid_inception_v3()
    (root / "fid-inception").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "fid-inception" / utility.FID_INCEPTION.files[0]))
    return root


def images(seed: int, n: int, size: int = 64, smooth: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
        if smooth:  # a different image distribution: blurred, low contrast
            x = 96 + 0.25 * (x + np.roll(x, 1, 0) + np.roll(x, 1, 1) + np.roll(x, 1, (0, 1))) / 4
        out.append(x.clip(0, 255).astype(np.uint8))
    return out


def save_folder(folder: Path, imgs: list[np.ndarray]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def fid_metric(reference: Path, **kw) -> Fid:
    """dims 64 (pytorch-fid's first block) unless asked: sqrtm of 2048x2048 costs ~50 s per FID on this CPU."""
    return Fid(build_params(Fid, {"reference": str(reference), "dims": 64, **kw}, "tiny", "test"))


def test_fid_without_weights_names_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "empty"))
    m = fid_metric(save_folder(tmp_path / "ref", images(0, 2)))
    reason = m.missing_weights()
    assert reason and "bench weights fetch fid-inception" in reason and "pt_inception" in reason
    with pytest.raises(WeightsUnavailable, match="bench weights fetch fid-inception"):
        m.compute(MetricInputs(subject=None, resolution=64, generated=images(1, 3)))
    # a suite that uses it is refused before anything runs (exit 2), naming the weights; `bench validate` says the
    # suite is well formed (exit 0) and lists the missing weights with the same command
    suite = write_suite(tmp_path, MICRO.replace("metrics: [linf, psnr, brisque]",
                                                f"metrics: [{{name: fid, reference: {tmp_path / 'ref'}}}]"))
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "o")]) == 2
    assert "bench weights fetch fid-inception" in capsys.readouterr().err
    assert main(["validate", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "cannot run here" in out and "bench weights fetch fid-inception" in out


def test_fid_algebra_with_random_inception_weights(tmp_path, monkeypatch, random_inception_weights):
    """random weights: FID(set, itself) ~ 0 < FID(set, other distribution); folder and .npz references agree."""
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(random_inception_weights))
    ref_imgs = images(0, 6)
    ref = save_folder(tmp_path / "ref", ref_imgs)
    m = fid_metric(ref)
    same = m.compute(MetricInputs(subject=None, resolution=64, generated=ref_imgs))
    other = m.compute(MetricInputs(subject=None, resolution=64, generated=images(5, 6, smooth=True)))
    assert abs(same) < 1e-3 * max(other, 1.0) and other > 0
    wfile = random_inception_weights / "fid-inception" / utility.FID_INCEPTION.files[0]
    feats = utility.inception_features(ref_imgs, wfile, 64)
    assert feats.shape == (6, 64) and utility.inception_features(ref_imgs[:1], wfile).shape == (1, 2048)
    np.savez(tmp_path / "ref.npz", mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False))
    via_npz = fid_metric(tmp_path / "ref.npz").compute(MetricInputs(subject=None, resolution=64,
                                                                    generated=images(5, 6, smooth=True)))
    assert via_npz == pytest.approx(other, rel=1e-9)
    assert utility.inception_model(str(wfile), 64) is utility.inception_model(str(wfile), 64)  # loaded once


def test_fid_protocol_pins_reference_prompts_and_sampler(tmp_path):
    ref = save_folder(tmp_path / "coco", images(0, 2))
    prompts = tmp_path / "captions.csv"
    prompts.write_text("image_id,caption\n1,a dog on a beach\n2,a red car\n3,a bowl of soup\n")
    a = fid_metric(ref).protocol_id()
    b = fid_metric(ref, prompts_file=str(prompts), num_prompts=2).protocol_id()
    assert fid_metric(ref, dims=2048).protocol_id().startswith("fid/pytorch-fid-pool3/ref=coco-")
    assert a.startswith("fid/pytorch-fid-dims64/ref=coco-") and "prompts=generic-10:10" in a and "ddim10-cfg3" in a
    assert "prompts=captions-" in b and ":2/" in b and str(tmp_path) not in b
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "captions.csv"
    moved.write_bytes(prompts.read_bytes())
    assert fid_metric(ref, prompts_file=str(moved), num_prompts=2).protocol_id() == b  # content, not path
    moved.write_text("image_id,caption\n1,a cat\n2,a red car\n")
    assert fid_metric(ref, prompts_file=str(moved), num_prompts=2).protocol_id() != b
    labelled = fid_metric(ref, prompts_file=str(prompts), prompts_label="coco-val2014-5k", reference_label="coco-5k-img")
    assert "/ref=coco-5k-img/prompts=coco-val2014-5k:3/" in labelled.protocol_id()
    assert fid_metric(ref, prompts_file=str(prompts), num_prompts=2).sampling()["prompts"] == ["a dog on a beach", "a red car"]
    paper = Fid(build_params(Fid, {"reference": str(ref)}, "paper", "test"))
    assert paper.sampling() | {"prompts": None} == {"prompts": None, "sampler": "pndm", "steps": 20, "guidance": 7.5,
                                                     "n_per_prompt": 1}  # APDM evaluate.py
    (tmp_path / "bad.csv").write_text("id,url\n1,x\n")
    with pytest.raises(ValueError, match="no 'caption'"):
        utility.load_prompts(str(tmp_path / "bad.csv"), 0)


def test_fid_end_to_end_samples_the_attackers_base_model(out_dir, tmp_path, monkeypatch, random_inception_weights):
    """random weights: the `sample` stage runs once per base model (undefended vs hardened), is shared by the
    scenario's cells, and a rerun recomputes nothing."""
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(random_inception_weights))
    ref = save_folder(tmp_path / "ref", images(0, 4))
    body = MICRO.replace("defenses: [none, {name: random-noise, eps: 8}]", "defenses: [none, random-noise, test-harden]") \
                .replace("metrics: [linf, psnr, brisque]", f"metrics: [{{name: fid, reference: {ref}, num_prompts: 3, dims: 64}}]")
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    from bench.runner import RunOptions, prepare

    plan = prepare(RunOptions(suite=str(suite), out=out_dir)).plan
    samples = {c.keys["defense"]: [k for k in c.stages if plan.stages[k].kind == "sample"] for c in plan.cells}
    assert samples["none"] == samples["random-noise"] != samples["test-harden"]  # utility of the model, not the images
    assert len({k for v in samples.values() for k in v}) == 2
    df = pd.read_csv(out_dir / "leaderboards" / "micro.csv").set_index("defense")
    col = [c for c in df.columns if c.startswith("fid/") and not c.endswith((" std", " n"))][0]
    assert df.loc["none", col] == df.loc["random-noise", col] != df.loc["test-harden", col]
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    import json

    assert json.loads((out_dir / "summary.json").read_text())["stages_run"] == 0


def test_two_class_watermark_metrics_from_scores():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    separated = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4])
    assert WatermarkAuc().from_scores(labels, separated) == 1.0
    assert WatermarkAuc().from_scores(labels, np.full(7, 0.5)) == 0.5
    overlap = np.array([0.9, 0.35, 0.2, 0.1, 0.3, 0.4, 0.6])
    # pairs (pos > neg): 0.9 beats 4, 0.35 beats 2 (0.1, 0.3), 0.2 beats 1 (0.1) -> 7 of 12
    assert WatermarkAuc().from_scores(labels, overlap) == pytest.approx(7 / 12)
    assert WatermarkAccuracy().from_scores(labels, overlap) == pytest.approx((1 + 3) / 7)  # threshold 0.5
    tpr = WatermarkTprAtFpr(build_params(WatermarkTprAtFpr, {"fpr": 0.25}, "tiny", "t"))
    assert tpr.from_scores(labels, overlap) == pytest.approx(1 / 3)  # lowering the threshold to 0.35 passes 0.4 and 0.6: fpr 1/2
    assert WatermarkTprAtFpr().from_scores(labels, overlap) == pytest.approx(1 / 3)  # at fpr 0: only 0.9 > 0.6


def test_apdm_reference_columns_are_the_ids_our_metrics_produce(tmp_path):
    """leaderboards/apdm_reference.csv joins a run only if its columns are exactly our protocol ids (paper profile)."""
    from bench.leaderboard import GROUP
    from bench.plugins import METRICS
    from bench.registry import load_builtins

    load_builtins()
    captions = tmp_path / "coco_val2014_5k.txt"
    captions.write_text("\n".join(f"caption {i}" for i in range(5000)))
    coco = {"prompts_file": str(captions), "prompts_label": "coco-val2014-5k"}
    specs = [("dino", {}), ("brisque", {}), ("clip-score", coco),
             ("fid", {**coco, "reference": str(save_folder(tmp_path / "coco", images(0, 2))),
                      "reference_label": "coco-val2014-5k"})]
    ours = {METRICS.get(n)(build_params(METRICS.get(n), kw, "paper", "t")).protocol_id() for n, kw in specs}
    ref = pd.read_csv(Path(__file__).resolve().parents[1] / "leaderboards" / "apdm_reference.csv")
    assert {c for c in ref.columns if c not in GROUP and c != "source"} == ours


def test_bench_weights_list_and_fetch_failure_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    import urllib.error

    from bench import weights

    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "w"))
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "fid-inception [missing]" in out and "insightface-buffalo_l [missing]" in out and "dino-vits16" in out
    assert main(["weights", "fetch", "fid-inceptoin"]) == 2  # unknown name: did you mean

    def offline(url, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(weights, "download", offline)
    assert main(["weights", "fetch", "fid-inception"]) == 1
    assert "fid-inception: fetch failed" in capsys.readouterr().err
    assert not (tmp_path / "w" / "fid-inception").exists() and list((tmp_path / "w").iterdir()) == []
