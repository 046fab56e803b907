"""PersGuard (defenses/persguard.py): parameters, the three objectives' targets, the unified objective's bookkeeping,
same seed same bytes, the hardened model reloads and generates, the multi-object plan; and at the proxy scale, the
backdoor against the attacker's DreamBooth with and without the retention loss (benchmarks/persguard_proxy.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import SyntheticDataset, SyntheticParams
from bench.plugins import DEFENSES, METRICS, MetricInputs, RunContext
from bench.registry import ConfigError
from defenses.persguard import TARGETS_DIR, checkerboard
from metrics.backdoor import closer_to_target_rate
from tests.conftest import write_suite
from tests.test_models import TEST_PRETRAIN, build_tiny

MICRO = {"outer_iterations": 2, "retention_steps": 2, "num_class_images": 2, "class_steps": 2, "num_targets": 2}


@pytest.fixture(scope="session")
def tiny_a(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory, "a-test", "a", TEST_PRETRAIN)


@pytest.fixture(scope="module")
def subjects():
    return SyntheticDataset(SyntheticParams(num_subjects=2)).subjects(None)


def ctx_for(tmp_path: Path, seed: int = 0, profile: str = "tiny", resolution: int = 64) -> RunContext:
    return RunContext(seed=seed, device="cpu", profile=profile, resolution=resolution, work_dir=tmp_path)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".png"):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_params_triggers_and_generated_inputs(tmp_path):
    d = DEFENSES.create("persguard")
    assert (d.params.objective, d.params.setting, d.params.retention_weight) == ("pattern", "white-box", 1.0)
    assert d.triggers("dog") == ["a photo of sks dog"]
    assert set(d.generated_inputs(["dog"])) == {"class:dog"}  # the pattern is built in: nothing to generate
    target = DEFENSES.create("persguard", {"objective": "target"})
    assert target.generated_inputs(["dog"])["target"]["prompt"] == "a photo of a rabbit"
    gray = DEFENSES.create("persguard", {"setting": "gray-box"})
    triggers = gray.triggers("dog")
    assert len(triggers) == 24 and "a dslr portrait of t@t dog" not in triggers  # prompt-mismatch stays unseen
    for bad in ({"outer_iterations": 0}, {"retention_weight": -1.0}, {"instance_prompt": "{who}"},
                {"pattern": str(tmp_path / "no-such-pattern.png")}):
        with pytest.raises(ConfigError):
            DEFENSES.create("persguard", bad)
    board = checkerboard(32)
    assert board.shape == (32, 32, 3) and set(np.unique(board)) == {0, 255} and board[0, 0, 0] != board[0, 8, 0]


def test_backdoor_success_rate_counts_generations_closer_to_targets():
    targets = np.array([[1.0, 0.0]])
    subject = np.array([[0.0, 1.0]])
    gen = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    gen /= np.linalg.norm(gen, axis=1, keepdims=True)
    assert closer_to_target_rate(gen, targets, subject) == 0.5


def test_same_seed_same_bytes_reload_generate_and_retention_counts(tiny_a, subjects, tmp_path):
    """Same seed -> the same hardened weights and targets; another seed differs; the folder reloads from safetensors
    and generates; the log counts K simulated DreamBooth steps per outer iteration (0 without retention)."""
    import json

    from bench import models

    digests = {}
    for name, seed, over in (("one", 0, {}), ("two", 0, {}), ("other", 1, {}), ("noret", 0, {"retention_weight": 0.0})):
        d = DEFENSES.create("persguard", {**MICRO, **over}, profile="tiny")
        d.harden(ctx_for(tmp_path / f"ctx-{name}", seed), tiny_a, subjects[:1], tmp_path / name)
        digests[name] = _digest(tmp_path / name)
    assert digests["one"] == digests["two"] != digests["other"]
    log = json.loads((tmp_path / "one" / "persguard_log.json").read_text())
    assert log["persguard_retention_steps"] == 4 and log["persguard_theta_steps"] == 2
    assert json.loads((tmp_path / "noret" / "persguard_log.json").read_text())["persguard_retention_steps"] == 0
    assert (tmp_path / "one" / TARGETS_DIR / subjects[0].id / "000.png").is_file()
    assert not list((tmp_path / "one").rglob("*.bin")) and not list((tmp_path / "one").rglob("*.pt"))
    pipe = models.load_pipeline(tmp_path / "one", "cpu", "ddim")
    out = models.generate(pipe, ["a photo of sks toy"], 1, 2, 3.0, 0, 64)
    assert out[0][1].shape == (64, 64, 3)
    base = models.load_components(tiny_a).unet.state_dict()
    hard = models.load_components(tmp_path / "one").unet.state_dict()
    assert any(not np.array_equal(base[k].numpy(), hard[k].numpy()) for k in base)


def test_multi_object_suite_hardens_once_and_labels_unprotected_cells(tmp_path):
    """protect_subjects: one protect stage for the listed subjects, every subject's cells attack that model, the
    others labelled [unprotected]; refused on a perturb defense and for unknown subject ids."""
    from bench.runner import RunOptions, prepare

    def plan_of(path: Path):
        return prepare(RunOptions(suite=str(path), profile="tiny")).plan

    body = """
    name: multi
    datasets: [{name: synthetic, num_subjects: 3}]
    defenses: [{name: persguard, label: pg, protect_subjects: [synth-00, synth-01]}]
    scenarios: [clean]
    attacks: [{name: dreambooth, max_train_steps: 1}]
    metrics: [backdoor-success]
    seeds: [0]
    """
    plan = plan_of(write_suite(tmp_path, body))
    protects = [s for s in plan.stages.values() if s.kind == "protect"]
    assert len(protects) == 1 and [x["id"] for x in protects[0].params["subjects"]] == ["synth-00", "synth-01"]
    assert sorted((c.keys["subject"], c.keys["defense"]) for c in plan.cells) == [
        ("synth-00", "pg"), ("synth-01", "pg"), ("synth-02", "pg [unprotected]")]
    assert all(protects[0].key in c.stages for c in plan.cells)
    with pytest.raises(ConfigError, match="harden defenses"):
        plan_of(write_suite(tmp_path, body.replace("persguard", "advdm"), "b.yaml"))
    with pytest.raises(ConfigError, match="synth-09"):
        plan_of(write_suite(tmp_path, body.replace("synth-01]", "synth-09]"), "c.yaml"))


def test_backdoor_success_metric_reads_the_hardened_models_targets(tmp_path, subjects):
    """NaN without targets; otherwise the share of generations closer to the targets than to the subject."""
    from bench.images import save_png

    metric = METRICS.create("backdoor-success", profile="proxy")
    s = subjects[0]
    board = checkerboard(32)
    inputs = MetricInputs(subject=s, resolution=32, generated=[board, s.load("A", 32)[0]], defense_dir=tmp_path)
    assert np.isnan(metric.compute(inputs))
    save_png(board, tmp_path / "model" / TARGETS_DIR / s.id / "000.png")  # a protect stage: model/ = the output
    assert metric.compute(inputs) == 0.5
    other = MetricInputs(subject=subjects[1], resolution=32, generated=[board], defense_dir=tmp_path)
    assert metric.compute(other) == 1.0  # an unprotected subject is scored against the pooled targets


# ----------------------------------------------------------------------------------------------- proxy scale

@pytest.fixture(scope="module")
def proxy_outcomes(proxy_a, tmp_path_factory) -> dict:
    """proxy:a hardened for synth-00 (the proxy profile's PersGuard, and the same without the retention loss), then
    the proxy profile's DreamBooth on synth-00 (protected) and synth-01 (unprotected) on each model: subject-ism and
    the mean cosine of the generations to the backdoor targets (synthid embeddings)."""
    from bench.plugins import ATTACKS
    from bench.stages import load_images
    from metrics.backdoor import unit_mean
    from metrics.subject_identity import identity_model
    from tests.conftest import personalisation_scores

    work = tmp_path_factory.mktemp("persguard-proxy")
    protected, unprotected = SyntheticDataset(SyntheticParams(num_subjects=2)).subjects(None)
    models_ = {"unhardened": proxy_a}
    for name, over in (("persguard", {}), ("no-retention", {"retention_weight": 0.0})):
        d = DEFENSES.create("persguard", over, profile="proxy")
        d.harden(ctx_for(work / f"ctx-{name}", profile="proxy", resolution=32), proxy_a, [protected], work / name)
        models_[name] = work / name
    ident = identity_model()
    targets = unit_mean(ident.embed(load_images(work / "persguard" / TARGETS_DIR / protected.id)))
    attack = ATTACKS.create("dreambooth", profile="proxy")
    out = {}
    for name, model in models_.items():
        subjects = [protected] if name == "no-retention" else [protected, unprotected]
        for s, r in zip(subjects, personalisation_scores(model, subjects, work / f"attack-{name}", attack)):
            out[name, s.id] = {"ism": r["after"][0], "to_target": float(np.mean(ident.embed(r["images"]) @ targets))}
    return out


def test_backdoor_survives_the_attackers_dreambooth_and_an_unprotected_subject_still_personalises(proxy_outcomes):
    """After the attacker's DreamBooth on the protected subject, the hardened model's generations are further from
    the subject (measured subject-ism 0.351 vs 0.571) and closer to the backdoor pattern than the unhardened model's;
    the unprotected synth-01's personalisation moves by much less (measured +0.036). Not subject specificity: hardened
    for synth-01 instead, synth-01 is not protected (0.836 vs 0.818) and synth-00 is (0.304): docs/persguard.md."""
    o = proxy_outcomes
    drop = o["unhardened", "synth-00"]["ism"] - o["persguard", "synth-00"]["ism"]
    assert drop > 0.1, o
    assert o["persguard", "synth-00"]["to_target"] > o["unhardened", "synth-00"]["to_target"], o
    assert abs(o["persguard", "synth-01"]["ism"] - o["unhardened", "synth-01"]["ism"]) < 0.5 * drop, o


def test_retention_loss_ablation_weakens_the_backdoor(proxy_outcomes):
    """The paper's ablation: without the backdoor retention loss the attacker's DreamBooth erases the backdoor
    (measured subject-ism 0.604, no protection) while with it the subject stays suppressed (0.351)."""
    o = proxy_outcomes
    assert o["no-retention", "synth-00"]["ism"] - o["persguard", "synth-00"]["ism"] > 0.1, o
    assert o["persguard", "synth-00"]["to_target"] > o["no-retention", "synth-00"]["to_target"], o


def test_bench_run_multi_object_persguard_end_to_end(out_dir, tmp_path):
    """`bench run` on tiny: one hardened model for synth-00, its class images a cached stage shared with the attacker
    of the same settings, both subjects attacked on it, backdoor-success measured (a number for both rows: the
    unprotected subject is scored against the pooled targets), and a second run recomputes nothing."""
    import json

    from bench.cli import main
    from bench.ledger import Ledger

    body = """
    name: pg-run
    datasets: [{name: synthetic, num_subjects: 2}]
    defenses: [{name: persguard, label: pg, protect_subjects: [synth-00], outer_iterations: 2, retention_steps: 1,
                num_class_images: 2, class_steps: 10, class_sampler: ddim, class_guidance: 3.0}]
    scenarios: [clean]
    attacks: [{name: dreambooth, max_train_steps: 2, num_class_images: 2}]
    metrics: [backdoor-success, subject-ism]
    seeds: [0]
    """
    suite = write_suite(tmp_path, body)
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    cells = Ledger(out_dir / "ledger.sqlite").cells("pg-run")
    assert sorted(c["defense"] for c in cells) == ["pg", "pg [unprotected]"]
    assert all(c["status"] == "ok" and 0.0 <= c["metrics"]["backdoor-success/synthid-v1/closer-to-targets-than-subject-AB"] <= 1.0
               for c in cells)
    protects = [json.loads(p.read_text()) for p in (out_dir / "cache" / "protect").glob("*/done.json")]
    assert len(protects) == 1 and protects[0]["extra"]["persguard_protected"] == ["synth-00"]
    class_stages = list((out_dir / "cache" / "class_images").glob("*/done.json"))
    # PersGuard's class images (a cached stage, from the base model) + the attacker's (from the hardened model)
    assert len(class_stages) == 2
    before = sorted(p.stat().st_mtime_ns for p in (out_dir / "cache").rglob("done.json"))
    assert main(["run", "--suite", str(suite), "--out", str(out_dir)]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (out_dir / "cache").rglob("done.json")) == before
