"""Subjects and the dataset plug-ins (DESIGN.md "Subject").

- ``synthetic``: procedurally drawn toys, built in, deterministic; the default on a fresh machine.
- ``vggface2`` / ``celebahq``: the Anti-DreamBooth face layout ``<root>/<id>/set_A|set_B|set_C/*.{png,jpg,jpeg}``
  (Van Le et al., "Anti-DreamBooth", ICCV 2023); class noun "person".
- ``dreambooth``: the DreamBooth dataset layout ``<root>/<subject>/*.jpg`` + ``<root>/prompts_and_classes.txt``
  (Ruiz et al., "DreamBooth", CVPR 2023).

Every file comes from a listing of the dataset root and must resolve inside it. Manifests in
``data_manifests/<name>.yaml`` describe each dataset and pin the sha256 of the files we know (``verify_root``).
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from bench.images import ImageError, file_sha256, fit, load_image
from bench.plugins import DATASETS, Dataset
from bench.registry import did_you_mean

SPLITS = ("A", "B", "C")  # A: clean reference, B: published (to protect), C: extra clean (leaks)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MANIFEST_DIR = Path(__file__).resolve().parents[1] / "data_manifests"


class DataError(ValueError):
    """A dataset root, subject folder or manifest that cannot be used; the message names it and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Synthetic subjects
# ----------------------------------------------------------------------------------------------------------------

SYNTH_VERSION = 1  # bump whenever render_synthetic's output changes
SYNTH_NATIVE_RESOLUTION = 512  # px, the size ``Subject.load(split, None)`` renders synthetic images at
_SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
_PATTERNS = ("stripes", "checker", "dots", "rings")
_SUPERSAMPLE = 2  # anti-aliasing: render at 2x and average 2x2 blocks


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float, phase: float) -> np.ndarray:
    """Inside test for a regular polygon centred at 0 (intersection of half-planes)."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = phase + 2 * math.pi * k / sides
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Object mask in object coordinates (unit radius)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return _polygon(u, v, 3, 0.6, math.pi / 2)
    if shape == "star":
        return r <= 0.72 + 0.28 * np.cos(5 * np.arctan2(v, u) + math.pi / 2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "hexagon":
        return _polygon(u, v, 6, 0.85, 0.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.35) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.35) & (np.abs(u) <= 0.95))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.5)
    raise ValueError(f"unknown synthetic shape {shape!r}")


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, freq: float, angle: float) -> np.ndarray:
    """Second-colour regions of the object's surface pattern, in object coordinates."""
    pu = u * math.cos(angle) + v * math.sin(angle)
    pv = -u * math.sin(angle) + v * math.cos(angle)
    if pattern == "stripes":
        return np.sin(math.pi * freq * pu) > 0
    if pattern == "checker":
        return (np.floor(0.75 * freq * pu) + np.floor(0.75 * freq * pv)) % 2 == 0
    if pattern == "dots":
        return np.cos(math.pi * freq * pu) * np.cos(math.pi * freq * pv) > 0.45
    if pattern == "rings":
        return np.sin(math.pi * freq * np.hypot(pu, pv)) > 0
    raise ValueError(f"unknown synthetic pattern {pattern!r}")


def render_synthetic(subject_seed: int, index: int, resolution: int) -> np.ndarray:
    """One image of synthetic subject ``subject_seed``: uint8 (resolution, resolution, 3) RGB.

    The subject (fixed by ``subject_seed``) is a saturated shape with a dark complementary surface pattern:
    shape = seed mod 8, pattern = (seed div 8) mod 4, hue = golden-ratio sequence, so seeds 0..31 all differ in
    shape or pattern and neighbouring seeds differ in colour. Each image (``index``) jitters position, scale,
    rotation and lighting and draws a fresh low-contrast striped, grainy background. Deterministic: numpy
    Generators seeded from (seed, index); the evaluation subjects use seeds 0..999, tiny-model pre-training
    uses seeds >= 1000.
    """
    if resolution < 8:
        raise ValueError(f"render_synthetic: resolution must be at least 8 px, got {resolution}")
    if subject_seed < 0 or index < 0:
        raise ValueError(f"render_synthetic: subject_seed and index must be >= 0, got {subject_seed}, {index}")
    srng = np.random.default_rng([subject_seed, 0])
    irng = np.random.default_rng([subject_seed, 1, index])
    shape = _SHAPES[subject_seed % len(_SHAPES)]
    pattern = _PATTERNS[(subject_seed // len(_SHAPES)) % len(_PATTERNS)]
    hue = (subject_seed * 0.6180339887) % 1.0
    body = _hsv(hue, 0.85, 0.95)
    ink = _hsv(hue + 0.5, 0.7, 0.25)
    freq = float(srng.uniform(2.0, 3.5))
    pat_angle = float(srng.uniform(0, math.pi))
    bg_hue = float(srng.uniform(0, 1))
    bg_a, bg_b = _hsv(bg_hue, 0.15, 0.55), _hsv(bg_hue + 0.1, 0.2, 0.72)

    cx, cy = irng.uniform(-0.1, 0.1, size=2)
    radius = float(irng.uniform(0.55, 0.68))  # in half-image units
    rot = float(irng.uniform(-0.45, 0.45))  # radians
    gain = float(irng.uniform(0.8, 1.15))
    light = float(irng.uniform(0, 2 * math.pi))
    bg_freq = float(irng.uniform(1.5, 3.5))
    bg_angle = float(irng.uniform(0, math.pi))
    bg_phase = float(irng.uniform(0, 2 * math.pi))

    n = resolution * _SUPERSAMPLE
    coords = ((np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0).astype(np.float32)
    x, y = np.meshgrid(coords, coords)  # x right, y down, both in [-1, 1]
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = -dx * math.sin(rot) + dy * math.cos(rot)

    t = 0.5 + 0.5 * np.sin(math.pi * bg_freq * (x * math.cos(bg_angle) + y * math.sin(bg_angle)) + bg_phase)
    img = bg_a + (bg_b - bg_a) * t[..., None]
    obj = _shape_mask(shape, u, v)
    colour = np.where(_pattern_mask(pattern, u, v, freq, pat_angle)[..., None], ink, body)
    shading = 1.0 + 0.18 * (x * math.cos(light) + y * math.sin(light))
    img = np.where(obj[..., None], colour * shading[..., None], img) * gain
    img = img.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    img = img + irng.normal(0.0, 0.02, size=(resolution, resolution, 1)) * (~obj[::_SUPERSAMPLE, ::_SUPERSAMPLE, None])
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# Words for a synthetic subject's attributes (proxy-model captions, identity-model heads). Colour = the nearest of
# these hue centres (circular distance) to the subject's body hue.
SYNTH_COLOURS = (("red", 0.0), ("orange", 30 / 360), ("yellow", 60 / 360), ("green", 120 / 360), ("cyan", 180 / 360),
                 ("blue", 230 / 360), ("purple", 275 / 360), ("pink", 320 / 360))
SYNTH_PATTERN_WORDS = {"stripes": "striped", "checker": "checkered", "dots": "dotted", "rings": "ringed"}


def synthetic_attributes(subject_seed: int) -> dict[str, Any]:
    """What ``render_synthetic`` draws for ``subject_seed``: shape, pattern and colour name (with their indices in
    ``_SHAPES``, ``_PATTERNS``, ``SYNTH_COLOURS``) and the body hue in [0, 1)."""
    hue = (subject_seed * 0.6180339887) % 1.0
    colour = min(range(len(SYNTH_COLOURS)), key=lambda k: min(abs(hue - SYNTH_COLOURS[k][1]),
                                                              1 - abs(hue - SYNTH_COLOURS[k][1])))
    shape, pattern = subject_seed % len(_SHAPES), (subject_seed // len(_SHAPES)) % len(_PATTERNS)
    return {"shape": _SHAPES[shape], "shape_index": shape, "pattern": _PATTERNS[pattern], "pattern_index": pattern,
            "colour": SYNTH_COLOURS[colour][0], "colour_index": colour, "hue": hue}


def synthetic_caption(subject_seed: int, class_noun: str = "toy") -> str:
    """"a photo of a(n) {colour} {pattern} {shape} {class_noun}", e.g. "a photo of a red striped circle toy"."""
    a = synthetic_attributes(subject_seed)
    article = "an" if a["colour"][0] in "aeiou" else "a"
    return f"a photo of {article} {a['colour']} {SYNTH_PATTERN_WORDS[a['pattern']]} {a['shape']} {class_noun}"


@dataclass(frozen=True)
class SyntheticImage:
    """A synthetic source: rendered on demand by ``render_synthetic``."""

    subject_seed: int
    index: int
    version: int = SYNTH_VERSION

    @property
    def name(self) -> str:
        return f"synth-{self.subject_seed:02d}-{self.index:03d}.png"

    def render(self, resolution: int | None) -> np.ndarray:
        return render_synthetic(self.subject_seed, self.index, resolution or SYNTH_NATIVE_RESOLUTION)

    def spec(self) -> str:
        return json.dumps({"renderer": "render_synthetic", "subject_seed": self.subject_seed, "index": self.index,
                           "version": self.version, "native": SYNTH_NATIVE_RESOLUTION}, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------
# Subject
# ----------------------------------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: Path) -> str:
    """``file_sha256`` memoised per (resolved path, mtime, size) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = file_sha256(path)
    return _HASH_CACHE[key]


Source = Path | SyntheticImage


@dataclass(frozen=True)
class Subject:
    """One person or object: class noun and image splits A (clean reference), B (to protect), C (extra clean)."""

    dataset: str  # registry name, e.g. "vggface2"
    id: str  # e.g. "n000050", "dog", "synth-00"
    class_noun: str  # "person", "dog", ...
    splits: dict[str, tuple[Source, ...]]  # keys "A", "B", "C"
    eval_prompts: tuple[str, ...] = ()  # templates with {identifier} and {class_noun}; () = the profile default
    folders: dict[str, Path] = field(default_factory=dict, compare=False)  # split -> folder listed (for messages)

    def __hash__(self) -> int:
        return hash((self.dataset, self.id))

    def key(self) -> str:
        return f"{self.dataset}/{self.id}"

    def _sources(self, split: str) -> tuple[Source, ...]:
        if split not in self.splits:
            raise DataError(f"subject {self.key()}: unknown split {split!r}; expected one of {sorted(self.splits)}")
        sources = self.splits[split]
        if not sources:
            folder = self.folders.get(split)
            where = f"{folder}" if folder is not None else f"subject {self.key()}"
            exists = "" if folder is None or folder.is_dir() else " (folder does not exist)"
            raise DataError(f"{where}: split {split} of subject {self.key()} has no images{exists}; "
                            f"expected files ending in {', '.join(IMAGE_SUFFIXES)}")
        return sources

    def load(self, split: str, resolution: int | None) -> list[np.ndarray]:
        """The split's images as uint8 HxWx3 RGB, fitted to ``resolution`` (None = native size).

        Raises ImageError naming the file for a bad image, DataError naming the folder for an empty split."""
        out = []
        for src in self._sources(split):
            if isinstance(src, SyntheticImage):
                out.append(src.render(resolution))
            else:
                img = load_image(src)
                out.append(fit(img, resolution) if resolution is not None else img)
        return out

    def file_names(self, split: str) -> list[str]:
        return [s.name for s in self._sources(split)]

    def fingerprint(self) -> str:
        """sha256 over the subject's identity, class noun, prompts and the content of every source
        (file bytes, or the synthetic spec and renderer version), split by split in order."""
        h = hashlib.sha256()
        h.update(json.dumps([self.dataset, self.id, self.class_noun, list(self.eval_prompts)]).encode())
        for split in sorted(self.splits):
            h.update(f"\nsplit {split}\n".encode())
            for src in self.splits[split]:
                digest = (hashlib.sha256(src.spec().encode()).hexdigest() if isinstance(src, SyntheticImage)
                          else cached_file_sha256(src))
                h.update(f"{src.name} {digest}\n".encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Listing helpers
# ----------------------------------------------------------------------------------------------------------------

def _check_root(root: Path | None, dataset: str, expected: str) -> Path:
    if root is None:
        raise DataError(f"dataset {dataset!r} needs a folder (--data {dataset}=PATH); expected {expected}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: dataset folder for {dataset!r} does not exist; expected {expected}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root for {dataset!r} is not a folder; expected {expected}")
    return root


def _inside(path: Path, root: Path) -> Path:
    """``path`` itself, after checking that it resolves (symlinks followed) inside ``root``."""
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise DataError(f"{path}: resolves to {real}, outside the dataset root {real_root} (symlink escaping the root)")
    return path


def _visible(folder: Path, root: Path) -> list[Path]:
    """Entries of ``folder`` sorted by name, hidden ('.') and private ('_') names skipped, each checked inside root."""
    return [_inside(p, root) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if not p.name.startswith((".", "_"))]


def _images_in(folder: Path, root: Path) -> tuple[Path, ...]:
    if not folder.is_dir():
        return ()
    return tuple(p for p in _visible(folder, root) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _select(ids: list[str], wanted: tuple[str, ...], root: Path, dataset: str) -> list[str]:
    if not wanted:
        return ids
    for w in wanted:
        if w not in ids:
            raise DataError(f"{root}: dataset {dataset!r} has no subject {w!r}{did_you_mean(w, ids)}")
    return list(wanted)


def _sorted_by_name(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    return tuple(sorted(paths, key=lambda p: p.name))


# ----------------------------------------------------------------------------------------------------------------
# Dataset plug-ins
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticParams:
    num_subjects: int = 2
    images_per_split: int = 4

    def validate(self) -> None:
        if not 1 <= self.num_subjects <= 1000:
            raise ValueError(f"num_subjects must be in 1..1000 (seeds >= 1000 are kept for pre-training), "
                             f"got {self.num_subjects}")
        if self.images_per_split < 1:
            raise ValueError(f"images_per_split must be >= 1, got {self.images_per_split}")


@DATASETS.register("synthetic", version=SYNTH_VERSION)
class SyntheticDataset(Dataset):
    """Procedurally drawn toys (class noun "toy"), subject i rendered with seed i; split A takes image indices
    0..n-1, B n..2n-1, C 2n..3n-1 (n = images_per_split). Needs no files."""

    Params = SyntheticParams
    needs_root: ClassVar[bool] = False
    paper: ClassVar[str] = "built in (no paper): procedural stand-in for a subject, learnable at 64 px"

    def subjects(self, root: Path | None) -> list[Subject]:
        n = self.params.images_per_split
        return [Subject(dataset=self.name, id=f"synth-{seed:02d}", class_noun="toy",
                        splits={s: tuple(SyntheticImage(seed, k * n + i) for i in range(n))
                                for k, s in enumerate(SPLITS)})
                for seed in range(self.params.num_subjects)]


@dataclass(frozen=True)
class SubjectsParams:
    subjects: tuple[str, ...] = ()  # subject ids to use; () = all


FACE_LAYOUT = "the Anti-DreamBooth face layout <root>/<id>/set_A|set_B|set_C/*.png|jpg|jpeg"


class _FaceDataset(Dataset):
    """Anti-DreamBooth face layout; folders whose name starts with '_' or '.' (e.g. ``_target``) are not subjects."""

    Params = SubjectsParams
    paper: ClassVar[str] = "Van Le et al., Anti-DreamBooth, ICCV 2023 (50 identities x 12 images, sets A/B/C)"

    def subjects(self, root: Path | None) -> list[Subject]:
        root = _check_root(root, self.name, FACE_LAYOUT)
        folders = [p for p in _visible(root, root) if p.is_dir()]
        if not folders:
            raise DataError(f"{root}: no subject folders; expected {FACE_LAYOUT}")
        if not any((f / f"set_{s}").is_dir() for f in folders for s in SPLITS):
            raise DataError(f"{root}: not {FACE_LAYOUT}: none of its {len(folders)} folders "
                            f"(e.g. {folders[0].name}/) has a set_A, set_B or set_C folder")
        by_id = {f.name: f for f in folders}
        out = []
        for sid in _select(sorted(by_id), tuple(self.params.subjects), root, self.name):
            folder = by_id[sid]
            split_dirs = {s: _inside(folder / f"set_{s}", root) for s in SPLITS}
            splits = {s: _images_in(d, root) for s, d in split_dirs.items()}
            if not any(splits.values()):  # an empty subject folder is not a subject
                print(f"warning: {folder}: no images in set_A, set_B or set_C; skipped", file=sys.stderr)
                continue
            # a subject with an empty split is listed: its cells fail on load naming the folder; others go on
            out.append(Subject(dataset=self.name, id=sid, class_noun="person", splits=splits, folders=split_dirs))
        return out


@DATASETS.register("vggface2", version=1)
class VGGFace2(_FaceDataset):
    """VGGFace2 identities as split by Anti-DreamBooth (set_A reference, set_B to protect, set_C extra clean)."""

    manifest: ClassVar[str] = "vggface2.yaml"


@DATASETS.register("celebahq", version=1)
class CelebAHQ(_FaceDataset):
    """CelebA-HQ identities as split by Anti-DreamBooth (set_A reference, set_B to protect, set_C extra clean)."""

    manifest: ClassVar[str] = "celebahq.yaml"


DREAMBOOTH_LAYOUT = "the DreamBooth dataset layout <root>/prompts_and_classes.txt and <root>/<subject>/*.jpg"
LIVE_CLASSES = ("cat", "dog")  # DreamBooth: "live subjects" get the live-subject prompt list
_PROMPT_RE = re.compile(r"""(['"])(.*?)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


@dataclass(frozen=True)
class DreamBoothTable:
    """What ``prompts_and_classes.txt`` says: class noun per subject and the two prompt template lists."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]


def _parse_prompts(block: str, path: Path, heading: str) -> tuple[str, ...]:
    prompts = []
    for _, text in _PROMPT_RE.findall(block):
        if "{0}" not in text or "{1}" not in text:
            raise DataError(f"{path}: prompt {text!r} under {heading!r} lacks {{0}} (token) or {{1}} (class)")
        prompts.append(text.replace("{0}", "{identifier}").replace("{1}", "{class_noun}"))
    if not prompts:
        raise DataError(f"{path}: no prompts of the form 'a {{0}} {{1}} ...'.format(unique_token, class_token) "
                        f"under {heading!r}")
    return tuple(prompts)


def parse_prompts_and_classes(path: Path) -> DreamBoothTable:
    """Parse DreamBooth's ``prompts_and_classes.txt``: the ``subject_name,class`` table, then the
    "Object Prompts" and "Live Subject Prompts" lists, turning ``'a {0} {1} in the jungle'.format(unique_token,
    class_token)`` into the template ``a {identifier} {class_noun} in the jungle``."""
    text = path.read_text(encoding="utf-8")
    m_obj, m_live = text.find("Object Prompts"), text.find("Live Subject Prompts")
    header = re.search(r"^\s*subject_name\s*,\s*class\s*$", text, flags=re.M)
    if header is None or m_obj < 0 or m_live < 0 or not header.end() < m_obj < m_live:
        raise DataError(f"{path}: expected a 'subject_name,class' table, then 'Object Prompts' and "
                        f"'Live Subject Prompts' lists (DreamBooth's prompts_and_classes.txt)")
    table_end = re.search(r"^\s*Prompts\s*$", text[header.end():], flags=re.M)
    table = text[header.end(): header.end() + table_end.start()] if table_end else text[header.end():m_obj]
    classes = {}
    for line in table.splitlines():
        if not line.strip():
            continue
        name, sep, noun = (part.strip() for part in line.partition(","))
        if not sep or not name or not noun:
            raise DataError(f"{path}: class table line {line.strip()!r} is not 'subject_name,class'")
        classes[name] = noun
    if not classes:
        raise DataError(f"{path}: the 'subject_name,class' table is empty")
    return DreamBoothTable(classes=classes,
                           object_prompts=_parse_prompts(text[m_obj:m_live], path, "Object Prompts"),
                           live_prompts=_parse_prompts(text[m_live:], path, "Live Subject Prompts"))


def dreambooth_split(files: tuple[Path, ...]) -> dict[str, tuple[Path, ...]]:
    """Files sorted by name; B (to protect) = first ceil(n/2); A (clean reference) = the rest; C = A."""
    files = _sorted_by_name(files)
    nb = math.ceil(len(files) / 2)
    return {"A": files[nb:], "B": files[:nb], "C": files[nb:]}


@DATASETS.register("dreambooth", version=1)
class DreamBoothDataset(Dataset):
    """The DreamBooth dataset (30 subjects, 4-6 images each). Deterministic split per subject: files sorted by
    name; B (to protect) = the first ceil(n/2); A (clean reference) = the rest; C (extra clean, for leak
    scenarios) = the same files as A, as the dataset has too few images for three disjoint sets.
    Evaluation prompts: the 25 live-subject prompts for cats and dogs, the 25 object prompts otherwise."""

    Params = SubjectsParams
    manifest: ClassVar[str] = "dreambooth.yaml"
    paper: ClassVar[str] = "Ruiz et al., DreamBooth, CVPR 2023 (github.com/google/dreambooth dataset)"

    def subjects(self, root: Path | None) -> list[Subject]:
        root = _check_root(root, self.name, DREAMBOOTH_LAYOUT)
        table_path = root / "prompts_and_classes.txt"
        if not table_path.is_file():
            raise DataError(f"{root}: not {DREAMBOOTH_LAYOUT}: prompts_and_classes.txt is missing")
        table = parse_prompts_and_classes(_inside(table_path, root))
        folders = {p.name: p for p in _visible(root, root) if p.is_dir()}
        if not folders:
            raise DataError(f"{root}: no subject folders; expected {DREAMBOOTH_LAYOUT}")
        out = []
        for sid in _select(sorted(folders), tuple(self.params.subjects), root, self.name):
            folder = folders[sid]
            if sid not in table.classes:
                raise DataError(f"{folder}: subject {sid!r} is not in the class table of {table_path}")
            files = _images_in(folder, root)  # an empty folder fails its own cells on load, not the suite
            noun = table.classes[sid]
            prompts = table.live_prompts if noun in LIVE_CLASSES else table.object_prompts
            out.append(Subject(dataset=self.name, id=sid, class_noun=noun, splits=dreambooth_split(files),
                               eval_prompts=prompts, folders={s: folder for s in SPLITS}))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------------------

_MANIFEST_KEYS = ("name", "layout", "source", "license", "obtain")


def image_problems(subjects: list[Subject]) -> list[str]:
    """Every image a run would open, decoded at native size (symlinks out of the root were refused when the subjects
    were listed): one message per bad file or empty split, naming it. A run fails the cells of those subjects."""
    problems = []
    for s in subjects:
        for split in ("A", "B", *(("C",) if s.splits.get("C") else ())):
            try:
                sources = s._sources(split)
            except DataError as e:
                problems.append(str(e))
                continue
            for src in sources:
                if isinstance(src, SyntheticImage):
                    continue
                try:
                    load_image(src)
                except ImageError as e:
                    problems.append(str(e))
    return problems


def load_manifest(name: str) -> dict[str, Any]:
    """``data_manifests/<name>.yaml`` as a dict, checked for the keys name, layout, source, license, obtain and
    a ``files`` list of {path, sha256}."""
    path = MANIFEST_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MANIFEST_DIR.glob("*.yaml"))
        raise DataError(f"{path}: no manifest for dataset {name!r}{did_you_mean(name, known)}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: a manifest is a mapping with keys {', '.join(_MANIFEST_KEYS)}, files")
    for key in _MANIFEST_KEYS:
        if key not in doc:
            raise DataError(f"{path}: missing key {key!r}")
    files = doc.setdefault("files", []) or []
    if not isinstance(files, list):
        raise DataError(f"{path}: 'files' must be a list of {{path, sha256}}")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
            raise DataError(f"{path}: files[{i}] must have a relative 'path' and a 64-hex 'sha256', got {entry!r}")
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"{path}: files[{i}].path {entry['path']!r} must be relative to the root, without '..'")
    doc["files"] = files
    return doc


@dataclass
class VerifyReport:
    """Result of ``verify_root``: ``ok`` when no listed file is missing or differs (extra files are only listed)."""

    dataset: str
    root: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)  # (path, expected sha256, actual sha256)
    extra: list[str] = field(default_factory=list)  # image files under root that the manifest does not list
    optional_missing: list[str] = field(default_factory=list)  # absent files the manifest marks `optional: true`

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    def summary(self) -> str:
        state = "OK" if self.ok else "FAILED"
        return (f"{self.dataset} at {self.root}: {state}: {self.checked} checked, {len(self.missing)} missing, "
                f"{len(self.mismatched)} mismatched, {len(self.extra)} extra, {len(self.optional_missing)} optional absent")


def verify_root(dataset_name: str, root: Path) -> VerifyReport:
    """Check the files of ``root`` against ``data_manifests/<dataset_name>.yaml`` (sha256 of every listed file).
    An absent file marked ``optional: true`` (e.g. ``_target/target.jpg``, only the targeted Anti-DreamBooth variants
    read it) is reported in ``optional_missing`` and does not fail the check; present, its hash must match."""
    doc = load_manifest(dataset_name)
    root = _check_root(root, dataset_name, str(doc.get("layout", "")).strip())
    report = VerifyReport(dataset=dataset_name, root=root)
    listed = set()
    for entry in doc["files"]:
        rel = entry["path"]
        listed.add(rel)
        path = root / rel
        if not path.is_file():
            (report.optional_missing if entry.get("optional") else report.missing).append(rel)
            continue
        _inside(path, root)
        report.checked += 1
        actual = cached_file_sha256(path)
        if actual != entry["sha256"]:
            report.mismatched.append((rel, entry["sha256"], actual))
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and rel not in listed \
                and not any(part.startswith(".") for part in path.relative_to(root).parts):
            report.extra.append(rel)
    return report


__all__ = ["DataError", "Subject", "SyntheticImage", "render_synthetic", "SYNTH_VERSION", "SPLITS",
           "SyntheticDataset", "VGGFace2", "CelebAHQ", "DreamBoothDataset", "parse_prompts_and_classes",
           "dreambooth_split", "load_manifest", "verify_root", "VerifyReport", "cached_file_sha256", "ImageError",
           "image_problems"]
