"""The everyday commands answer without importing torch, diffusers, transformers, scipy.stats or pandas (issue 16:
`bench list` took 7-15 s when every plug-in module imported torch; bench/lazy.py), and say before a run which
columns cannot measure anything at this scale."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.registry import build_params
from metrics.faces import Fdfr, Ism

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "faces"
HEAVY = ("torch", "diffusers", "transformers", "scipy.stats", "pandas", "skimage.metrics")
PROBE = """
import json, sys
from bench.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "defenses"], ["list", "metrics"],
                                  ["validate", "robustness"], ["validate", "smoke", "--profile", "paper"]])
def test_everyday_commands_import_no_heavy_module(argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if argv == ["--help"]:  # argparse exits before the probe prints
        assert done.returncode == 0 and "usage: bench" in done.stdout
        return
    result = json.loads(last)
    assert result["code"] == 0, done.stderr
    assert result["heavy"] == [], f"`bench {' '.join(argv)}` imported {result['heavy']}"


def test_plugins_still_work_after_lazy_torch(tmp_path):
    """The lazy stand-in loads torch on first use: a defense that imported it lazily computes as before."""
    import torch

    from defenses import pgd

    assert pgd.torch.zeros(2).sum().item() == 0.0 and pgd.torch.Tensor is torch.Tensor
    from defenses.genwatermark import Detector, Generator  # moved to genwatermark_nets, still importable here

    assert issubclass(Generator, torch.nn.Module) and issubclass(Detector, torch.nn.Module)


def test_face_metrics_say_when_they_cannot_measure():
    make = lambda cls, **p: cls(build_params(cls, p, None, "t"))  # noqa: E731
    assert "do not generate faces" in make(Fdfr).cannot_measure(512, harness_models=True)
    assert make(Fdfr).cannot_measure(512, harness_models=False) is None
    assert make(Ism).cannot_measure(64, harness_models=False) is None  # HOG upsampled once finds 40 px faces
    why = make(Fdfr, upsample=0).cannot_measure(64, harness_models=False)
    assert "80 px" in why and "64 px" in why
    assert make(Fdfr, backend="insightface").cannot_measure(32, harness_models=False) is None  # SCRFD rescales


def test_a_face_suite_on_harness_models_is_warned_about_before_it_runs(capsys):
    if not FACES.is_dir():
        pytest.skip(f"real face data not found at {FACES}")
    assert main(["validate", "smoke", "--profile", "tiny", "--data", f"vggface2={FACES}"]) == 0
    err = capsys.readouterr().err
    assert "warning: fdfr, ism on vggface2 at the tiny profile" in err and "do not generate faces" in err
    assert main(["validate", "smoke", "--profile", "tiny"]) == 0  # synthetic subjects: no face metric applies
    assert "warning" not in capsys.readouterr().err
