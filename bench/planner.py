"""Suite -> DAG of stages keyed by content hashes (DESIGN.md "Data flow").

Stage kinds, in data-flow order:
  model        base model (tiny: built and pre-trained; real: resolved and hashed)
  protect      defense applied to a subject's set_B (perturb/watermark: images; harden: a model)
  compose      scenario applied to the protected set -> attacker's training set (transforms up to the first one
               that needs a model)
  purify       the rest of the scenario's transform chain, from its first model transform (DiffPure, noisy
               upscaling, IMPRESS: attacks/purification.py), on the composed set; only for such scenarios
  class_images prior-preservation images, per base model + class prompt
  attack       fine-tuning -> personalised weights
  generate     personalised model + evaluation prompts -> images
  sample       the attacker's base model (hardened or not), not personalised + a metric's prompt list -> images
               (model utility: FID, CLIP score)
  measure      one metric on generated, sampled or protected images
A key hashes the stage kind, its version, its parameters and the keys of its inputs, so equal work is one
stage whatever number of cells share it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.plugins import DEFENSES, TRANSFORMS, ScenarioSpec
from bench.precision import POLICY_VERSION as PRECISION_POLICY
from bench.profiles import Profile
from bench.registry import ConfigError
from bench.scenarios import split_at_model_transform
from bench.store import stable_hash
from bench.suites import Entry, Suite

BUILT_MODEL_FAMILIES = ("tiny", "proxy")  # bench.models.MODEL_FAMILIES (not imported here: it imports torch)

# Bump a kind's version when its runner's output changes.
STAGE_VERSIONS = {"model": 1, "protect": 1, "compose": 1, "purify": 1, "class_images": 1, "attack": 1, "generate": 1,
                  "sample": 1, "measure": 2}  # measure 2: value.json says why a value is NaN or inf ("reason")


@dataclass(frozen=True)
class Stage:
    kind: str
    params: dict
    deps: tuple[str, ...]
    label: str

    @property
    def key(self) -> str:
        return stable_hash({"kind": self.kind, "v": STAGE_VERSIONS[self.kind], "params": self.params, "deps": self.deps})


@dataclass
class Cell:
    """One grid point; its result row is assembled from its measure stages."""

    keys: dict[str, Any]  # dataset, subject, defense, scenario, attack, seed
    config: dict  # everything that defines the cell (hashed into config_hash)
    stages: list[str] = field(default_factory=list)  # every stage key the cell needs
    measures: dict[str, str] = field(default_factory=dict)  # protocol id -> measure stage key
    model_stages: dict[str, str] = field(default_factory=dict)  # role -> model stage key
    protect: str = ""  # the cell's own protect stage (a watermark cell also has the undefended run's)

    @property
    def cell_id(self) -> str:
        return stable_hash(self.keys)[:16]

    @property
    def config_hash(self) -> str:
        return stable_hash(self.config)[:16]


@dataclass
class Plan:
    stages: dict[str, Stage]  # key -> stage, in a topological order
    cells: list[Cell]
    invalid: list[tuple[dict, str]] = field(default_factory=list)  # cells that cannot be built, with reason

    def naive_stage_count(self) -> int:
        return sum(len(c.stages) for c in self.cells)


class _Builder:
    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}

    def add(self, kind: str, params: dict, deps: tuple[str, ...], label: str) -> str:
        stage = Stage(kind, params, deps, label)
        self.stages.setdefault(stage.key, stage)
        return stage.key


def plugin_spec(entry: Entry) -> dict:
    spec = {"name": entry.name, "version": entry.plugin_cls.version, "params": entry.params_dict()}
    if spec["params"].get("mixed_precision", "no") != "no":  # what a request computes may change with the policy
        spec["precision_policy"] = PRECISION_POLICY
    inputs = entry.create().inputs_fingerprint()
    if inputs:  # files named by a parameter (an external folder or model): their content is in the key
        spec["inputs"] = inputs
    return spec


def _subject_spec(dataset: Entry, subject) -> dict:
    return {"dataset": dataset.name, "root": str(dataset.extra.get("root") or ""),
            "dataset_params": dataset.params_dict(), "id": subject.id, "fingerprint": subject.fingerprint()}


def _fill(template: str, identifier: str, class_noun: str) -> str:
    return template.format(identifier=identifier, class_noun=class_noun)


def build_plan(suite: Suite, profile: Profile, subjects: dict[str, list]) -> Plan:
    """``subjects``: dataset label -> list of Subject (already loaded, so that bad data fails early per subject)."""
    b = _Builder()
    cells: list[Cell] = []

    def model_stage(role: str) -> str:
        ref = profile.models.get(role, role)  # a profile role, or a model reference itself
        params: dict[str, Any] = {"ref": ref}
        if ref.split(":", 1)[0] in BUILT_MODEL_FAMILIES:  # built and pre-trained by the harness (bench/models.py)
            params.update(pretrain=profile.pretrain, resolution=profile.resolution)
        return b.add("model", params, (), f"model {ref}")

    def protect_stage(defense, dspec: dict, roles: tuple[str, ...], protected: list, dataset: Entry, seed: int,
                      label: str) -> tuple[str, tuple[str, ...]]:
        """One protect stage; a harden defense protects ``protected`` (one subject, or the suite's
        ``protect_subjects``) in one model, other kinds protect one subject's images."""
        dkind = type(defense).defense_kind
        deps = tuple(model_stage(r) for r in roles)
        specs = [_subject_spec(dataset, s) for s in protected]
        params: dict[str, Any] = {"defense": dspec, "kind": dkind, "model_roles": list(roles), "seed": seed,
                                  "resolution": profile.resolution}
        if dkind == "harden":
            params["subjects"] = specs
        else:
            params["subject"] = specs[0]
        requests = defense.generated_inputs(sorted({s.class_noun for s in protected}))
        if requests:
            params["generated"] = {name: b.add("class_images", {**req, "seed": seed, "resolution": profile.resolution},
                                               (deps[0],), f"class images {req['prompt']!r}")
                                   for name, req in sorted(requests.items())}
            deps = deps + tuple(params["generated"].values())
        return b.add("protect", params, deps, f"protect {label}"), deps

    def attack_chain(protect: str, dkind: str, spec: ScenarioSpec, attack: Entry, subject, subj: dict, seed: int,
                     label: str) -> dict[str, Any]:
        """compose -> (purify) -> (class images) -> attack -> generate for one protected set, scenario and attack."""
        before, purified = split_at_model_transform(spec.transforms)
        compose = b.add("compose", {"scenario": _scenario_dict(dataclasses.replace(spec, transforms=before)),
                                    "subject": subj, "seed": seed, "resolution": profile.resolution}, (protect,),
                        f"compose {label}")
        training_set = purify_stage(compose, purified, subject, seed, label) if purified else compose
        role = "mismatch" if spec.attacker_model == "mismatch" else "default"
        # A harden defense's output model is the attacker's base model when the attacker uses the model the
        # defense hardened (not under model mismatch).
        attacker_model = protect if (dkind == "harden" and role == "default") else model_stage(role)
        identifier = profile.mismatch_identifier if spec.identifier == "<mismatch>" else (spec.identifier or profile.identifier)
        template = profile.mismatch_prompt if spec.instance_prompt == "<mismatch>" else (spec.instance_prompt or profile.instance_prompt)
        instance_prompt = _fill(template, identifier, subject.class_noun)
        class_prompt = _fill(profile.class_prompt, identifier, subject.class_noun)
        gen = profile.generation
        use_subject = gen.use_subject_prompts and subject.eval_prompts
        eval_prompts = [_fill(t, identifier, subject.class_noun) for t in (subject.eval_prompts if use_subject else gen.prompts)]
        plugin = attack.create()
        n_class = plugin.class_images_needed()
        attack_deps = [attacker_model, training_set]
        if n_class:
            attack_deps.append(b.add("class_images", {
                "prompt": class_prompt, "n": n_class, "sampler": profile.class_sampler, "steps": profile.class_steps,
                "guidance": gen.guidance, "seed": seed, "resolution": profile.resolution}, (attacker_model,),
                f"class images {class_prompt!r}"))
        attack_params = {"attack": plugin_spec(attack), "instance_prompt": instance_prompt,
                         "class_prompt": class_prompt, "seed": seed, "resolution": profile.resolution}
        words = plugin.token_words(identifier, subject.class_noun)
        if words:  # only attacks that learn a token: other attacks' stage keys are unchanged
            attack_params["words"] = words
        trained = b.add("attack", attack_params, tuple(attack_deps), f"attack {attack.label} <- {label}")
        generated = b.add("generate", {"prompts": eval_prompts, "sampler": gen.sampler, "steps": gen.steps,
                                       "guidance": gen.guidance, "n_per_prompt": gen.n_per_prompt, "seed": seed,
                                       "resolution": profile.resolution, "attack": plugin_spec(attack)},
                          (attacker_model, trained), f"generate {attack.label} {label}")
        return {"stages": {compose, trained, generated, *attack_deps, *b.stages[training_set].deps},
                "generated": generated,
                "attacker_model": attacker_model, "instance_prompt": instance_prompt, "eval_prompts": eval_prompts,
                "prompt_templates": dict(zip(eval_prompts, subject.eval_prompts if use_subject else gen.prompts))}

    def purify_stage(compose: str, chain, subject, seed: int, label: str) -> str:
        """The attacker's purification of a composed set: ``chain`` from its first model transform on, computed once
        per (composed set, chain, seed, resolution, purifier models) however many attacks and cells train on it."""
        roles = list(dict.fromkeys(r for name, params in chain for r in TRANSFORMS.create(name, dict(params)).model_roles()))
        params = {"transforms": [list(t) for t in chain], "model_roles": roles, "class_noun": subject.class_noun,
                  "seed": seed, "resolution": profile.resolution}
        return b.add("purify", params, (compose, *(model_stage(r) for r in roles)), f"purify {label}")

    baseline_spec = {"name": "none", "version": DEFENSES.get("none").version, "params": {}}
    for dataset in suite.datasets:
        for subject in subjects.get(dataset.label, []):
            subj = _subject_spec(dataset, subject)
            for seed in suite.seeds:
                for defense in suite.defenses:
                    dcls = defense.plugin_cls
                    dspec = plugin_spec(defense)
                    plugin = defense.create()
                    roles = plugin.model_roles()
                    protected = protected_subjects(defense, dataset, subjects.get(dataset.label, []), subject)
                    protect, protect_deps = protect_stage(plugin, dspec, roles, protected, dataset, seed,
                                                          f"{defense.label} {' '.join(s.key() for s in protected)}")
                    defense_label = defense.label if subject in protected else f"{defense.label} [unprotected]"
                    for scenario in suite.scenarios:
                        spec: ScenarioSpec = scenario.create().spec()  # a leak larger than set_B fails that cell
                        label = f"{scenario.label} {defense.label} {subject.key()}"
                        for attack in suite.attacks:
                            chain = attack_chain(protect, dcls.defense_kind, spec, attack, subject, subj, seed, label)
                            attacker_model, generated = chain["attacker_model"], chain["generated"]
                            cell_stages = {protect, *protect_deps, *chain["stages"]}
                            measures: dict[str, str] = {}
                            for metric, m, pid, prompt in _measures(suite, chain["prompt_templates"]):
                                deps: tuple[str, ...]
                                if m.target == "model":
                                    sample = b.add("sample", {**m.sampling(), "seed": seed, "resolution": profile.resolution},
                                                   (attacker_model,), f"sample {pid}")
                                    deps = (sample, protect)
                                elif m.target == "protected":
                                    deps = (protect,)
                                else:
                                    deps = (generated, protect)
                                if m.needs_baseline and dcls.defense_kind == "watermark":
                                    # the same attack on the undefended images: the negatives of a detection metric
                                    base_protect, _ = protect_stage(DEFENSES.get("none")(), baseline_spec, (),
                                                                    [subject], dataset, seed, f"none {subject.key()}")
                                    base = attack_chain(base_protect, "perturb", spec, attack, subject, subj, seed,
                                                        f"{scenario.label} none {subject.key()}")
                                    cell_stages |= {base_protect, *base["stages"]}
                                    deps = deps + (base["generated"],)
                                mparams = {"metric": plugin_spec(metric), "protocol": pid, "subject": subj,
                                           "resolution": profile.resolution, "target": m.target,
                                           "defense_kind": dcls.defense_kind, "defense": defense.name}
                                if prompt is not None:
                                    mparams["prompt"] = prompt
                                mkey = b.add("measure", mparams, deps, f"measure {pid}")
                                measures[pid] = mkey
                                cell_stages |= set(deps) | {mkey}
                            keys = {"dataset": dataset.label, "subject": subject.id, "defense": defense_label,
                                    "scenario": scenario.label, "attack": attack.label, "seed": seed}
                            config = {"keys": keys, "defense": dspec, "scenario": _scenario_dict(spec),
                                      "attack": plugin_spec(attack), "profile": profile.name,
                                      "subject_fingerprint": subj["fingerprint"], "instance_prompt": chain["instance_prompt"],
                                      "eval_prompts": chain["eval_prompts"], "metrics": sorted(measures)}
                            cells.append(Cell(keys, config, sorted(cell_stages), measures,
                                              {"defense": protect_deps[0] if protect_deps else "", "attacker": attacker_model},
                                              protect))
    ordered = _topological(b.stages)
    return Plan(ordered, cells)


def protected_subjects(defense: Entry, dataset: Entry, all_subjects: list, subject) -> list:
    """The subjects one protect stage protects: the cell's own, or a harden defense's ``protect_subjects`` (one model
    hardened for all of them, PersGuard's multi-object setting; cells of the other subjects measure how the hardened
    model treats an unprotected subject)."""
    wanted = defense.extra.get("protect_subjects")
    if not wanted:
        return [subject]
    by_id = {s.id: s for s in all_subjects}
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise ConfigError(f"defense {defense.label}: protect_subjects {missing} are not subjects of dataset "
                          f"{dataset.label} (it has {sorted(by_id)[:10]}{' ...' if len(by_id) > 10 else ''})")
    return [by_id[w] for w in wanted]


def _measures(suite: Suite, templates: dict[str, str]):
    """(entry, metric, protocol id, prompt or None) per leaderboard column; a ``per_prompt`` metric gives one column
    per evaluation prompt, named by the prompt's template (so subjects of other classes share it)."""
    for entry in suite.metrics:
        m = entry.create()
        pid = m.protocol_id()
        if entry.extra.get("per_prompt"):
            for prompt, template in templates.items():
                yield entry, m, f"{pid}/prompt={template}", prompt
        else:
            yield entry, m, pid, None


def _scenario_dict(spec: ScenarioSpec) -> dict:
    return spec.__dict__ | {"transforms": [list(t) for t in spec.transforms]}


def _topological(stages: dict[str, Stage]) -> dict[str, Stage]:
    order: dict[str, Stage] = {}

    def visit(key: str) -> None:
        if key in order:
            return
        for d in stages[key].deps:
            visit(d)
        order[key] = stages[key]

    for k in stages:
        visit(k)
    return order


def stage_depths(stages: dict[str, Stage]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for key, st in stages.items():  # topological order
        depth[key] = 1 + max((depth[d] for d in st.deps), default=-1)
    return depth
