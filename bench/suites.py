"""YAML suites: a grid of datasets x defenses x scenarios x attacks x metrics x seeds (DESIGN.md "Suite").

Entries are a plug-in name or a mapping ``{name: ..., label: ..., <params>}``. ``defenses: all`` means every
registered defense with its default parameters. Validation errors name the file, the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.plugins import ATTACKS, DATASETS, DEFENSES, METRICS, SCENARIOS
from bench.registry import ConfigError, Registry, build_params, did_you_mean, params_dict

SUITES_DIR = Path(__file__).resolve().parent / "suites"
TOP_KEYS = {"name", "description", "datasets", "defenses", "scenarios", "attacks", "metrics", "seeds", "models"}


@dataclass(frozen=True)
class Entry:
    """One resolved plug-in choice in a suite."""

    kind: str
    name: str
    label: str
    params: Any  # the plug-in's Params instance
    plugin_cls: type
    extra: dict  # non-parameter keys (dataset: root)
    unavailable: str = ""  # why it cannot run here (missing module or weights; the suite is still well formed)

    def params_dict(self) -> dict:
        return params_dict(self.params)

    def create(self):
        return self.plugin_cls(self.params)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    datasets: tuple[Entry, ...]
    defenses: tuple[Entry, ...]
    scenarios: tuple[Entry, ...]
    attacks: tuple[Entry, ...]
    metrics: tuple[Entry, ...]
    seeds: tuple[int, ...]
    models: dict[str, str]  # model-role overrides for the chosen profile (suite key `models: {paper: {default: sd15}}`)

    def cannot_run(self) -> list[str]:
        """Why a well-formed suite cannot run on this machine: each plug-in whose modules or weights are missing."""
        entries = self.datasets + self.defenses + self.scenarios + self.attacks + self.metrics
        return [e.unavailable for e in entries if e.unavailable]


def suite_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"suite file {p} does not exist")
        return p
    builtin = SUITES_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        names = [f.stem for f in SUITES_DIR.glob("*.yaml")]
        raise ConfigError(f"unknown suite {name_or_path!r}{did_you_mean(name_or_path, names)} "
                          "(or give a path to a .yaml file)")
    return builtin


def _label(name: str, given: dict[str, Any]) -> str:
    if not given:
        return name
    inner = ",".join(f"{k}={v}" for k, v in sorted(given.items()))
    return f"{name}({inner})"


def _entry(registry: Registry, raw: Any, where: str, profile: str, extra_keys: tuple[str, ...] = ()) -> Entry:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ConfigError(f"{where}: expected a {registry.kind} name or a mapping with 'name', got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name")
    label = raw.pop("label", None)
    by_profile = raw.pop("by_profile", {}) or {}
    if not isinstance(by_profile, dict) or not all(isinstance(v, dict) for v in by_profile.values()):
        raise ConfigError(f"{where}: by_profile must map a profile name to parameters, e.g. by_profile: {{paper: {{max_train_steps: 800}}}}")
    extra = {k: raw.pop(k) for k in extra_keys if k in raw}
    cls = registry.get(name, where)
    params = build_params(cls, {**raw, **by_profile.get(profile, {})}, profile, f"{where} ({name})")
    reason = cls.missing_modules() or cls(params).missing_weights()
    unavailable = f"{where}: {registry.kind} {name!r} is unavailable here: {reason}" if reason else ""
    return Entry(registry.kind, name, str(label or _label(name, raw)), params, cls, extra, unavailable)


def _metric_entry(raw: Any, where: str, profile: str) -> Entry:
    """A metric; ``per_prompt: true`` asks for one column per evaluation prompt (Anti-DreamBooth's test.py reports
    FDFR/ISM per prompt), each measured on that prompt's images only."""
    entry = _entry(METRICS, raw, where, profile, ("per_prompt",))
    per_prompt = entry.extra.get("per_prompt", False)
    if not isinstance(per_prompt, bool):
        raise ConfigError(f"{where}: per_prompt must be true or false, got {per_prompt!r}")
    if per_prompt and entry.plugin_cls.target != "generated":
        raise ConfigError(f"{where}: per_prompt applies to metrics of generated images; {entry.name!r} measures "
                          f"{entry.plugin_cls.target} images")
    return entry


def _defense_entry(raw: Any, where: str, profile: str) -> Entry:
    """A defense; a harden defense may take ``protect_subjects: [id, ...]``: one model hardened for all of them (the
    multi-object setting), every subject of the dataset evaluated on it (the others as ``<label> [unprotected]``)."""
    entry = _entry(DEFENSES, raw, where, profile, ("protect_subjects",))
    wanted = entry.extra.get("protect_subjects")
    if wanted is not None:
        if entry.plugin_cls.defense_kind != "harden":
            raise ConfigError(f"{where}: protect_subjects applies to harden defenses; {entry.name!r} is a "
                              f"{entry.plugin_cls.defense_kind} defense (it protects each subject's own images)")
        if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) for w in wanted) \
                or len(set(wanted)) != len(wanted):
            raise ConfigError(f"{where}: protect_subjects must be a non-empty list of distinct subject ids, got {wanted!r}")
    return entry


def _list(doc: dict, key: str, path: Path) -> list:
    value = doc.get(key)
    if value is None:
        raise ConfigError(f"{path}: missing key {key!r}")
    if key == "defenses" and value == "all":
        return standard_defenses()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: {key!r} must be a non-empty list")
    return value


def load_suite(name_or_path: str, profile: str, data: dict[str, Path] | None = None, runnable: bool = True) -> Suite:
    """Parse and validate a suite; ``data`` (from --data NAME=PATH) replaces the suite's datasets. ``runnable``: also
    refuse a plug-in whose modules or weights are missing here (else they are listed by ``Suite.cannot_run()``)."""
    path = suite_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a suite is a mapping with keys {sorted(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}{did_you_mean(key, sorted(TOP_KEYS))}")
    if data:
        raw_datasets: list = [{"name": n, "root": str(p)} for n, p in data.items()]
    else:
        raw_datasets = _list(doc, "datasets", path)
    datasets = tuple(_entry(DATASETS, d, f"--data {d['name']}={d['root']}" if data else f"{path}: datasets[{i}]", profile,
                            ("root",)) for i, d in enumerate(raw_datasets))
    for d in datasets:
        if d.plugin_cls.needs_root and not d.extra.get("root"):
            raise ConfigError(f"{path}: dataset {d.name!r} needs a folder: pass --data {d.name}=PATH "
                              f"(see data_manifests/{d.name}.yaml for how to obtain it)")
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    models = doc.get("models", {}) or {}
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigError(f"{path}: 'models' maps a profile name to role overrides, e.g. models: {{paper: {{default: sd15}}}}")
    suite = Suite(
        models={str(k): str(v) for k, v in models.get(profile, {}).items()},
        name=str(doc.get("name", path.stem)),
        path=path,
        description=str(doc.get("description", "")),
        datasets=datasets,
        defenses=tuple(_defense_entry(d, f"{path}: defenses[{i}]", profile) for i, d in enumerate(_list(doc, "defenses", path))),
        scenarios=tuple(_entry(SCENARIOS, d, f"{path}: scenarios[{i}]", profile) for i, d in enumerate(_list(doc, "scenarios", path))),
        attacks=tuple(_entry(ATTACKS, d, f"{path}: attacks[{i}]", profile) for i, d in enumerate(_list(doc, "attacks", path))),
        metrics=tuple(_metric_entry(d, f"{path}: metrics[{i}]", profile) for i, d in enumerate(_list(doc, "metrics", path))),
        seeds=tuple(seeds),
    )
    for kind in ("defenses", "scenarios", "attacks", "metrics"):
        labels = [e.label for e in getattr(suite, kind)]
        dup = {l for l in labels if labels.count(l) > 1}
        if dup:
            raise ConfigError(f"{path}: {kind} has duplicate labels {sorted(dup)}; give each a distinct 'label'")
    if runnable and suite.cannot_run():
        raise ConfigError("\n".join(suite.cannot_run()))
    return suite


def standard_defenses() -> list[str]:
    """What `defenses: all` means: every registered defense but test-only ones and those that read the user's own
    files (``external``, ``external-model``)."""
    return sorted(n for n, cls in DEFENSES.items()
                  if not getattr(cls, "test_only", False) and not getattr(cls, "user_inputs", False))


def builtin_suites() -> list[str]:
    return sorted(f.stem for f in SUITES_DIR.glob("*.yaml"))
