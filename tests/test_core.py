"""Registry, suite validation, planner sharing, scenarios and the baseline defenses (no model training)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.plugins import DEFENSES, SCENARIOS, Defense, RunContext, ScenarioSpec
from bench.profiles import get_profile
from bench.registry import ConfigError, load_builtins
from bench.scenarios import compose_training_set, leak_count
from bench.suites import load_suite
from defenses.baselines import project_to_budget

load_builtins()


def write_suite(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(textwrap.dedent(body))
    return p


BASE = """
name: t
datasets: [synthetic]
defenses: [none, random-noise]
scenarios: [clean, {name: leak, k: 1, label: leak-1}]
attacks: [dreambooth]
metrics: [linf, psnr]
seeds: [0]
"""


def test_duplicate_registration_is_rejected():
    with pytest.raises(ConfigError, match="duplicate defense name 'none'"):
        @DEFENSES.register("none")
        class Other(Defense):
            pass


def test_unknown_plugin_name_says_did_you_mean(tmp_path):
    p = write_suite(tmp_path, BASE.replace("random-noise", "random-nosie"))
    with pytest.raises(ConfigError) as e:
        load_suite(str(p), "tiny")
    assert "random-nosie" in str(e.value) and "did you mean 'random-noise'" in str(e.value) and str(p) in str(e.value)


def test_bad_parameter_names_key_and_fix(tmp_path):
    p = write_suite(tmp_path, BASE.replace("random-noise]", "{name: random-noise, epsilon: 8}]"))
    with pytest.raises(ConfigError, match=r"no parameter 'epsilon'; did you mean 'eps'"):
        load_suite(str(p), "tiny")
    p = write_suite(tmp_path, BASE.replace("random-noise]", "{name: random-noise, eps: loud}]"))
    with pytest.raises(ConfigError, match=r"eps: expected a number"):
        load_suite(str(p), "tiny")
    p = write_suite(tmp_path, BASE.replace("random-noise]", "{name: random-noise, eps: 300}]"))
    with pytest.raises(ConfigError, match=r"eps must be in"):
        load_suite(str(p), "tiny")


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = write_suite(tmp_path, "name: t\ndefenses: [none\nscenarios: [clean]\n")
    with pytest.raises(ConfigError, match=r"suite.yaml: line \d+, column \d+ invalid YAML"):
        load_suite(str(p), "tiny")


def test_unknown_top_level_key(tmp_path):
    p = write_suite(tmp_path, BASE + "metric: [linf]\n")
    with pytest.raises(ConfigError, match="unknown key 'metric'; did you mean 'metrics'"):
        load_suite(str(p), "tiny")


def test_profile_overrides_apply_and_explicit_params_win(tmp_path):
    suite = load_suite(str(write_suite(tmp_path, BASE)), "tiny")
    attack = suite.attacks[0]
    tiny = type(attack.params)(**{**attack.params.__dict__})
    assert attack.params.max_train_steps == attack.plugin_cls.profiles["tiny"]["max_train_steps"]
    paper = load_suite(str(write_suite(tmp_path, BASE)), "paper").attacks[0].params
    assert paper.max_train_steps == 1000 and paper.learning_rate == 5e-7  # Anti-DreamBooth's attacker (METHODS 1.7)
    explicit = load_suite(str(write_suite(tmp_path, BASE.replace("[dreambooth]", "[{name: dreambooth, max_train_steps: 7}]"))), "tiny")
    assert explicit.attacks[0].params.max_train_steps == 7 and tiny.max_train_steps != 7


def test_plan_shares_work_and_counts_naive():
    profile = get_profile("tiny")
    suite = load_suite("smoke", "tiny")
    from bench.runner import RunOptions, prepare

    plan = prepare(RunOptions(suite="smoke")).plan
    kinds = {}
    for s in plan.stages.values():
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    n_subj = 2  # synthetic default
    assert len(plan.cells) == n_subj * 2 * 2  # subjects x defenses x scenarios x 1 attack
    assert kinds["model"] == 1  # one base model shared by everything
    assert kinds["protect"] == n_subj * 2  # shared across scenarios and attacks
    assert kinds["class_images"] == 1  # one per model + class prompt: both subjects are "toy"
    assert kinds["attack"] == len(plan.cells)
    # protected-image metrics are shared across scenarios: 3 protected metrics x protects
    assert plan.naive_stage_count() > len(plan.stages)
    # keys depend on parameters: a different seed gives different keys
    assert len({s.key for s in plan.stages.values()}) == len(plan.stages)


def test_changed_parameter_changes_exactly_its_dependents(tmp_path):
    from bench.runner import RunOptions, prepare

    a = prepare(RunOptions(suite=str(write_suite(tmp_path, BASE)))).plan
    b = prepare(RunOptions(suite=str(write_suite(tmp_path, BASE.replace("random-noise]", "{name: random-noise, eps: 4}]"))))).plan
    shared = set(a.stages) & set(b.stages)
    only_a = [a.stages[k] for k in set(a.stages) - shared]
    # everything downstream of random-noise's protect changes; the undefended chain, models, class images do not
    assert {s.kind for s in only_a} <= {"protect", "compose", "attack", "generate", "measure"}
    assert all(("random-noise" in s.label) or s.kind == "measure" for s in only_a if s.kind != "measure")
    assert any(s.kind == "model" for k, s in a.stages.items() if k in shared)
    assert any(s.kind == "class_images" for k, s in a.stages.items() if k in shared)


def _imgs(n, v):
    return [np.full((8, 8, 3), v + i, np.uint8) for i in range(n)]


def test_leak_replaces_last_k_with_set_c_then_originals():
    prot, clean_b, clean_c = _imgs(4, 100), _imgs(4, 0), _imgs(2, 200)
    rng = np.random.default_rng(0)
    imgs, origin = compose_training_set(prot, clean_b, clean_c, ScenarioSpec(leak="N-1"), rng)
    assert origin == ["protected", "set_C[0]", "set_C[1]", "clean_B[3]"]
    assert imgs[0][0, 0, 0] == 100 and imgs[1][0, 0, 0] == 200 and imgs[3][0, 0, 0] == 3
    assert leak_count("N", 4) == 4 and leak_count(0, 4) == 0
    with pytest.raises(ValueError, match="has only 4"):
        leak_count(5, 4)


def test_transform_scenario_applies_in_order():
    prot = [np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)]
    spec = SCENARIOS.create("transform", {"transforms": [{"name": "hflip", "p": 1.0}]}).spec()
    imgs, _ = compose_training_set(prot, prot, [], spec, np.random.default_rng(0))
    assert np.array_equal(imgs[0], prot[0][:, ::-1])


@pytest.mark.parametrize("eps", [1.0, 4.0, 6.375, 8.0, 16.0])
@pytest.mark.parametrize("dist", ["uniform", "sign"])
def test_random_noise_respects_budget_to_the_last_pixel(tmp_path, eps, dist):
    rng = np.random.default_rng(1)
    clean = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    clean[0][:4] = 0
    clean[0][4:8] = 255  # saturated pixels must stay in range
    d = DEFENSES.create("random-noise", {"eps": eps, "distribution": dist})
    ctx = RunContext(seed=3, device="cpu", profile="tiny", resolution=32, work_dir=tmp_path)
    out = d.protect(ctx, clean, None, None)
    for o, c in zip(out, clean):
        diff = np.abs(o.astype(int) - c.astype(int))
        assert o.dtype == np.uint8 and diff.max() <= int(eps)
        assert diff.max() == int(eps) or dist == "uniform"
    again = d.protect(RunContext(seed=3, device="cpu", profile="tiny", resolution=32, work_dir=tmp_path), clean, None, None)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    assert not np.array_equal(out[1], clean[1])


def test_project_to_budget_clips_overshoot():
    c = np.array([[[10, 250, 0]]], np.uint8)
    out = project_to_budget(c, c + np.array([[[9.7, 9.7, -9.7]]]), 6.375)
    assert out.tolist() == [[[16, 255, 0]]]


def test_bench_list_and_validate_exit_codes(capsys):
    from bench.cli import main

    assert main(["list", "defenses"]) == 0
    out = capsys.readouterr().out
    assert "random-noise" in out and "eps" in out
    assert main(["list", "metrics"]) == 0
    assert "brisque/pypi-brisque/native" in capsys.readouterr().out
    assert main(["validate", "robustness"]) == 0
    assert "naive per-cell stage executions" in capsys.readouterr().out
    assert main(["run", "--suite", "smoek"]) == 2
    assert "did you mean 'smoke'" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--data", "vggface2=/nonexistent/faces"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["list", "defences"]) == 2


def test_robustness_suite_names_every_registered_defense():
    """robustness lists its defenses explicitly (so that one whose paper budget needs missing weights can name its
    alternative per profile); a newly registered defense must be added there."""
    from bench.plugins import DEFENSES
    from bench.suites import load_suite, standard_defenses

    suite = load_suite("robustness", "tiny")
    registered = set(standard_defenses())
    assert registered <= {d.name for d in suite.defenses}


def test_a_plugin_with_a_required_parameter_is_not_listed_unavailable():
    from bench.plugins import TRANSFORMS

    assert TRANSFORMS.get("resize").unavailable_reason() is None
