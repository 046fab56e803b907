"""bench.datasets: synthetic subjects, the face and DreamBooth layouts (tmp folders and ../shared/data), manifests."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.datasets import (
    DataError,
    DreamBoothDataset,
    SyntheticDataset,
    VGGFace2,
    CelebAHQ,
    Subject,
    SyntheticImage,
    dreambooth_split,
    load_manifest,
    parse_prompts_and_classes,
    render_synthetic,
    verify_root,
)
from bench.images import ImageError, save_png
from bench.registry import ConfigError, build_params

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA} (../shared/data)")


def _img(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _face_root(root: Path, ids=("p1", "p2"), per_split: int = 2) -> Path:
    for i, sid in enumerate(ids):
        for s in "ABC":
            for k in range(per_split):
                save_png(_img(100 * i + 10 * ord(s) + k), root / sid / f"set_{s}" / f"{k:02d}.png")
    return root


# --- synthetic -------------------------------------------------------------------------------------------------

def test_render_synthetic_is_deterministic_and_well_formed():
    a, b = render_synthetic(0, 0, 64), render_synthetic(0, 0, 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert a.tobytes() == b.tobytes()
    assert render_synthetic(1000, 3, 32).shape == (32, 32, 3)  # pre-training seeds work too
    assert a.std() > 30  # high contrast, not a flat image
    assert not np.array_equal(a, render_synthetic(0, 1, 64))  # per-image jitter


def _object_chroma(img: np.ndarray) -> np.ndarray:
    """Chromaticity of the saturated (object) pixels; the background is kept desaturated."""
    x = img.reshape(-1, 3).astype(float)
    obj = x[x.max(1) - x.min(1) > 100]
    assert len(obj) > 0.05 * len(x)  # the object (its bright half) covers a learnable part of the image
    m = obj.mean(0)
    return m / m.sum()


def test_synthetic_subjects_are_distinct_and_images_of_one_subject_alike():
    seeds = range(8)
    feats = {s: [_object_chroma(render_synthetic(s, i, 64)) for i in range(4)] for s in seeds}
    for s in seeds:
        within = max(np.abs(x - y).sum() for x in feats[s] for y in feats[s])
        for t in seeds:
            if t != s:
                between = min(np.abs(x - y).sum() for x in feats[s] for y in feats[t])
                assert within < between, (s, t, within, between)
    # and the pixels themselves differ a lot between subjects
    assert np.abs(render_synthetic(0, 0, 64).astype(int) - render_synthetic(1, 0, 64)).mean() > 20


def test_synthetic_dataset_subjects():
    ds = SyntheticDataset(build_params(SyntheticDataset, {"num_subjects": 3, "images_per_split": 2}, None, "test"))
    assert SyntheticDataset.name == "synthetic" and SyntheticDataset.needs_root is False
    subs = ds.subjects(None)
    assert [s.id for s in subs] == ["synth-00", "synth-01", "synth-02"]
    assert {s.class_noun for s in subs} == {"toy"}
    s0 = subs[0]
    assert s0.key() == "synthetic/synth-00"
    indices = [src.index for split in "ABC" for src in s0.splits[split]]
    assert indices == list(range(6))  # disjoint splits
    imgs = s0.load("B", 64)
    assert len(imgs) == 2 and imgs[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(imgs[0], render_synthetic(0, 2, 64))
    assert s0.load("A", None)[0].shape == (512, 512, 3)
    assert s0.file_names("C") == ["synth-00-004.png", "synth-00-005.png"]
    assert s0.fingerprint() == ds.subjects(None)[0].fingerprint()
    assert len({s.fingerprint() for s in subs}) == 3


def test_synthetic_params_are_validated():
    with pytest.raises(ConfigError, match="num_subjects"):
        build_params(SyntheticDataset, {"num_subjects": 0}, None, "test")
    with pytest.raises(ConfigError, match="num_subjects"):
        build_params(SyntheticDataset, {"num_subjects": 1001}, None, "test")


def test_synthetic_fingerprint_follows_renderer_version():
    a = Subject("synthetic", "x", "toy", {"A": (SyntheticImage(0, 0),)})
    b = Subject("synthetic", "x", "toy", {"A": (SyntheticImage(0, 0, version=99),)})
    assert a.fingerprint() != b.fingerprint()


# --- face layout (tmp folders) ---------------------------------------------------------------------------------

def test_face_layout_lists_subjects_and_skips_private_folders(tmp_path):
    root = _face_root(tmp_path / "faces")
    save_png(_img(7), root / "_target" / "target.png")
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("not a subject")
    (root / "p1" / "set_A" / "notes.txt").write_text("ignored")
    subs = VGGFace2().subjects(root)
    assert [s.id for s in subs] == ["p1", "p2"]
    assert all(s.class_noun == "person" and s.dataset == "vggface2" for s in subs)
    assert subs[0].file_names("A") == ["00.png", "01.png"]
    assert [x.shape for x in subs[0].load("B", 32)] == [(32, 32, 3)] * 2
    only = VGGFace2(build_params(VGGFace2, {"subjects": ["p2"]}, None, "t")).subjects(root)
    assert [s.id for s in only] == ["p2"]
    assert CelebAHQ().subjects(root)[0].dataset == "celebahq"


def test_unknown_subject_is_named(tmp_path):
    root = _face_root(tmp_path / "faces")
    ds = VGGFace2(build_params(VGGFace2, {"subjects": ["p3"]}, None, "t"))
    with pytest.raises(DataError, match="no subject 'p3'"):
        ds.subjects(root)


def test_missing_root_and_file_root(tmp_path):
    with pytest.raises(DataError, match="does not exist.*set_A"):
        VGGFace2().subjects(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        VGGFace2().subjects(tmp_path / "file")
    with pytest.raises(DataError, match="needs a folder"):
        VGGFace2().subjects(None)


def test_empty_subject_folder_is_skipped_with_a_warning_and_an_empty_split_fails_naming_it(tmp_path, capsys):
    root = _face_root(tmp_path / "faces")
    (root / "p3").mkdir()
    assert "p3" not in [s.id for s in VGGFace2().subjects(root)]  # not a subject: no cells planned for it
    assert "p3: no images in set_A, set_B or set_C; skipped" in capsys.readouterr().err
    (root / "p4" / "set_A").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "p4" / "set_A" / "0.png")
    partial = [s for s in VGGFace2().subjects(root) if s.id == "p4"][0]  # listed: only its own cells fail
    with pytest.raises(DataError, match=r"p4/set_B: split B of subject vggface2/p4 has no images \(folder does not exist\)"):
        partial.load("B", 64)


def test_empty_split_names_the_folder_on_load(tmp_path):
    root = _face_root(tmp_path / "faces")
    for f in (root / "p1" / "set_C").iterdir():
        f.unlink()
    subject = VGGFace2().subjects(root)[0]
    assert len(subject.load("A", 64)) == 2
    with pytest.raises(DataError, match=r"set_C: split C of subject vggface2/p1 has no images"):
        subject.load("C", 64)
    with pytest.raises(DataError, match="unknown split 'D'"):
        subject.load("D", 64)


def test_bad_image_in_split_names_the_file(tmp_path):
    root = _face_root(tmp_path / "faces")
    (root / "p2" / "set_B" / "01.png").write_bytes(b"\x89PNG broken")
    subject = VGGFace2().subjects(root)[1]
    with pytest.raises(ImageError, match=r"p2/set_B/01.png"):
        subject.load("B", 64)


def test_symlink_escaping_the_root_is_refused(tmp_path):
    root = _face_root(tmp_path / "faces")
    outside = tmp_path / "secret.png"
    save_png(_img(9), outside)
    link = root / "p1" / "set_A" / "02.png"
    os.symlink(outside, link)
    with pytest.raises(DataError, match=r"02.png.*outside the dataset root"):
        VGGFace2().subjects(root)


def test_symlink_inside_the_root_is_allowed(tmp_path):
    root = _face_root(tmp_path / "faces")
    os.symlink(root / "p1" / "set_A" / "00.png", root / "p1" / "set_A" / "02.png")
    assert len(VGGFace2().subjects(root)[0].splits["A"]) == 3


def test_fingerprint_tracks_file_content(tmp_path):
    root = _face_root(tmp_path / "faces")
    before = VGGFace2().subjects(root)[0].fingerprint()
    assert VGGFace2().subjects(root)[0].fingerprint() == before
    target = root / "p1" / "set_B" / "00.png"
    save_png(_img(12345), target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # mtime moves even on coarse clocks
    assert VGGFace2().subjects(root)[0].fingerprint() != before


def test_face_loader_on_a_dreambooth_like_root_fails_clearly(tmp_path):
    root = tmp_path / "db"
    save_png(_img(1), root / "dog" / "00.png")
    with pytest.raises(DataError, match="not the Anti-DreamBooth face layout"):
        VGGFace2().subjects(root)


# --- DreamBooth layout (tmp folders) ---------------------------------------------------------------------------

PROMPTS = """Classes

subject_name,class
toyA,toy
pup,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def _db_root(root: Path, counts: dict[str, int]) -> Path:
    root.mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    for i, (sid, n) in enumerate(counts.items()):
        for k in range(n):
            save_png(_img(i * 10 + k), root / sid / f"{k:02d}.jpg")  # content type does not depend on suffix
    return root


def test_parse_prompts_and_classes(tmp_path):
    p = _db_root(tmp_path / "db", {}) / "prompts_and_classes.txt"
    table = parse_prompts_and_classes(p)
    assert table.classes == {"toyA": "toy", "pup": "dog"}
    assert table.object_prompts == ("a {identifier} {class_noun} in the jungle", "a red {identifier} {class_noun}")
    assert table.live_prompts == ("a {identifier} {class_noun} wearing a red hat",)


def test_parse_rejects_other_text(tmp_path):
    p = tmp_path / "prompts_and_classes.txt"
    p.write_text("just some text\n")
    with pytest.raises(DataError, match="prompts_and_classes.txt: expected a 'subject_name,class' table"):
        parse_prompts_and_classes(p)


def test_dreambooth_split_rule():
    files = tuple(Path(f"{k:02d}.jpg") for k in (4, 0, 2, 1, 3))
    split = dreambooth_split(files)
    assert [p.name for p in split["B"]] == ["00.jpg", "01.jpg", "02.jpg"]  # ceil(5/2) first by name
    assert [p.name for p in split["A"]] == ["03.jpg", "04.jpg"]
    assert split["C"] == split["A"]
    assert [len(dreambooth_split(tuple(Path(f"{k}.jpg") for k in range(n)))["B"]) for n in (1, 4, 6)] == [1, 2, 3]


def test_dreambooth_tmp_layout(tmp_path):
    root = _db_root(tmp_path / "db", {"toyA": 5, "pup": 4})
    subs = {s.id: s for s in DreamBoothDataset().subjects(root)}
    assert subs["pup"].class_noun == "dog" and subs["toyA"].class_noun == "toy"
    assert subs["pup"].eval_prompts == ("a {identifier} {class_noun} wearing a red hat",)
    assert len(subs["toyA"].eval_prompts) == 2
    assert subs["toyA"].file_names("B") == ["00.jpg", "01.jpg", "02.jpg"]
    assert len(subs["toyA"].load("A", 64)) == 2


def test_dreambooth_subject_missing_from_class_table(tmp_path):
    root = _db_root(tmp_path / "db", {"toyA": 2, "stranger": 2})
    with pytest.raises(DataError, match="stranger.*not in the class table"):
        DreamBoothDataset().subjects(root)


def test_dreambooth_empty_subject_folder(tmp_path):
    root = _db_root(tmp_path / "db", {"toyA": 2})
    (root / "pup").mkdir()
    pup = [s for s in DreamBoothDataset().subjects(root) if s.id == "pup"][0]
    with pytest.raises(DataError, match=r"pup: split B of subject dreambooth/pup has no images"):
        pup.load("B", 64)


def test_dreambooth_loader_on_face_layout_fails_clearly(tmp_path):
    root = _face_root(tmp_path / "faces")
    with pytest.raises(DataError, match="not the DreamBooth dataset layout.*prompts_and_classes.txt is missing"):
        DreamBoothDataset().subjects(root)


# --- manifests -------------------------------------------------------------------------------------------------

def test_manifests_describe_each_dataset():
    for name in ("vggface2", "celebahq", "dreambooth"):
        doc = load_manifest(name)
        assert doc["name"] == name
        for key in ("layout", "source", "license", "obtain"):
            assert isinstance(doc[key], str) and doc[key].strip(), (name, key)
    assert load_manifest("celebahq")["files"] == []
    assert len(load_manifest("dreambooth")["files"]) == 158
    paths = {f["path"] for f in load_manifest("vggface2")["files"]}
    assert "_target/target.jpg" in paths and len(paths) == 25
    with pytest.raises(DataError, match="no manifest for dataset 'vgface2'.*vggface2"):
        load_manifest("vgface2")


def test_verify_root_detects_a_changed_byte(tmp_path):
    doc = load_manifest("vggface2")
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    root = tmp_path / "faces"
    picked = [f["path"] for f in doc["files"][:2]]
    for rel in picked:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATA / "faces" / rel, root / rel)
    data = bytearray((root / picked[1]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / picked[1]).write_bytes(bytes(data))
    save_png(_img(3), root / "n000050" / "set_A" / "zz_extra.png")
    report = verify_root("vggface2", root)
    assert not report.ok
    assert report.checked == 2
    assert [m[0] for m in report.mismatched] == [picked[1]]
    rel, expected, actual = report.mismatched[0]
    assert expected == doc["files"][1]["sha256"] and actual != expected and len(actual) == 64
    assert len(report.missing) == len(doc["files"]) - 3 and picked[0] not in report.missing
    assert report.optional_missing == ["_target/target.jpg"]
    assert report.extra == ["n000050/set_A/zz_extra.png"]
    assert "FAILED" in report.summary()


# --- the real data in ../shared/data ---------------------------------------------------------------------------

@needs_data
def test_real_faces_load_four_per_split_at_512():
    subs = VGGFace2().subjects(DATA / "faces")
    assert [s.id for s in subs] == ["n000033", "n000050"]  # _target is not a subject
    for s in subs:
        for split in "ABC":
            imgs = s.load(split, 512)
            assert len(imgs) == 4, (s.id, split)
            assert all(i.shape == (512, 512, 3) and i.dtype == np.uint8 for i in imgs)
        assert not set(s.file_names("A")) & set(s.file_names("B"))


@needs_data
def test_real_dreambooth_subjects_classes_and_prompts():
    subs = {s.id: s for s in DreamBoothDataset().subjects(DATA / "dreambooth")}
    assert len(subs) == 30
    assert subs["dog"].class_noun == "dog"
    assert subs["cat2"].class_noun == "cat"
    assert subs["bear_plushie"].class_noun == "stuffed animal"
    assert subs["pink_sunglasses"].class_noun == "glasses"
    assert all(len(s.eval_prompts) == 25 for s in subs.values())
    live = {sid for sid, s in subs.items() if "a {identifier} {class_noun} wearing a red hat" in s.eval_prompts}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    assert subs["backpack"].eval_prompts[0].format(identifier="sks", class_noun="backpack") == \
        "a sks backpack in the jungle"
    for s in subs.values():
        n = len(s.splits["A"]) + len(s.splits["B"])
        assert len(s.splits["B"]) == math.ceil(n / 2) and s.splits["C"] == s.splits["A"]
    assert [x.shape for x in subs["duck_toy"].load("B", 64)] == [(64, 64, 3)] * 2


@needs_data
def test_real_roots_verify_against_manifests():
    for name, folder in (("dreambooth", "dreambooth"), ("vggface2", "faces")):
        report = verify_root(name, DATA / folder)
        assert report.ok, report.summary()
        assert report.checked == len(load_manifest(name)["files"]) and not report.extra


@needs_data
def test_real_dreambooth_loader_on_faces_root_fails_clearly():
    with pytest.raises(DataError, match="faces: not the DreamBooth dataset layout"):
        DreamBoothDataset().subjects(DATA / "faces")
    with pytest.raises(DataError, match="dreambooth: not the Anti-DreamBooth face layout"):
        VGGFace2().subjects(DATA / "dreambooth")


def test_optional_target_absent_is_reported_not_a_failure(tmp_path, capsys):
    """`bench data verify vggface2=ROOT` passes when only the optional `_target/target.jpg` is absent (issue 16)."""
    from bench.cli import main

    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    root = tmp_path / "faces"
    shutil.copytree(DATA / "faces", root, ignore=shutil.ignore_patterns("_target"))
    report = verify_root("vggface2", root)
    assert report.ok and report.optional_missing == ["_target/target.jpg"] and not report.missing
    assert main(["data", "verify", f"vggface2={root}"]) == 0
    assert "optional, absent (not an error): _target/target.jpg" in capsys.readouterr().out
    (root / "n000050" / "set_A" / sorted(p.name for p in (root / "n000050" / "set_A").iterdir())[0]).unlink()
    assert main(["data", "verify", f"vggface2={root}"]) == 1  # a required file missing still fails
