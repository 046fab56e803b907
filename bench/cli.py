"""``bench``: run suites, list plug-ins, validate suites, print leaderboards, verify data and cached artifacts, fetch
metric weights.

Exit status: 0 all cells ok; 1 some cells failed (the rest finished and were saved); 2 invalid suite or
command line (nothing ran).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bench.registry import ConfigError, describe_params, did_you_mean, load_builtins


def _data_arg(values: list[str] | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values or []:
        if "=" not in v:
            raise ConfigError(f"--data {v!r}: expected NAME=PATH, e.g. --data vggface2=../shared/data/faces")
        name, path = v.split("=", 1)
        out[name.strip()] = Path(path).expanduser()
    return out


def _kv_arg(values: list[str] | None, flag: str) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for v in values or []:
        if "=" not in v:
            raise ConfigError(f"{flag} {v!r}: expected KEY=VALUE, e.g. {flag} partition=gpu")
        k, raw = v.split("=", 1)
        out[k.strip()] = yaml.safe_load(raw)  # numbers and booleans typed as in YAML
    return out


def cmd_run(a: argparse.Namespace) -> int:
    from bench.runner import RunOptions, describe_plan, execute, prepare

    opts = RunOptions(suite=a.suite, profile=a.profile, out=Path(a.out), data=_data_arg(a.data), executor=a.executor,
                      executor_params=_kv_arg(a.executor_opt, "--executor-opt"), dry_run=a.dry_run,
                      allow_unsafe_weights=a.allow_unsafe_weights, keep_weights=a.keep_weights, device=a.device,
                      jobs=_jobs_arg(a.jobs), retries=a.retries)
    if opts.retries < 0:
        raise ConfigError(f"--retries {a.retries}: must be 0 or more")
    prepared = prepare(opts)
    _warn(prepared.warnings)
    if a.dry_run:
        print(describe_plan(prepared))
        return _report_bad_inputs(prepared)
    summary = execute(prepared, opts)
    print(f"cells ok {summary['cells_ok']}/{summary['cells_total']}, stages run {summary['stages_run']}, "
          f"cached {summary['stages_cached']}, failed {summary['stages_failed']} ({summary['wall_s']} s)")
    for cell, reason in summary["failures"].items():
        print(f"FAILED {cell}: {reason}", file=sys.stderr)
    print(f"leaderboard: {summary['leaderboard_csv']}")
    return 1 if summary["cells_failed"] else 0


def _jobs_arg(value: str | None) -> int:
    """--jobs (else ``BENCH_JOBS``): a positive number, or "auto" / unset (0: every core, or one per GPU)."""
    raw = value if value is not None else os.environ.get("BENCH_JOBS", "auto")
    if raw.strip().lower() == "auto":
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        where = "--jobs" if value is not None else "BENCH_JOBS"
        raise ConfigError(f"{where} {raw!r}: expected a positive number of workers or 'auto'")
    return n


def cmd_status(a: argparse.Namespace) -> int:
    """Stage states of an output folder, from its ledger (the driver records every transition)."""
    from collections import Counter

    from bench.ledger import Ledger

    db = Path(a.out) / "ledger.sqlite"
    if not db.is_file():
        raise ConfigError(f"no run in {a.out} (no ledger.sqlite); start one with `bench run --out {a.out}`")
    ledger = Ledger(db)
    states = ledger.stage_states()
    ledger.close()
    order = ["queued", "running", "done", "failed"]
    total = Counter(s["state"] for s in states)
    print(f"{a.out}: " + ", ".join(f"{total.get(st, 0)} {st}" for st in order) + " stages")
    for kind in sorted({s["kind"] for s in states}):
        c = Counter(s["state"] for s in states if s["kind"] == kind)
        print(f"  {kind:13s}" + "  ".join(f"{st} {c.get(st, 0):4d}" for st in order))
    for s in states:
        if s["state"] == "running":
            job = f", job {s['job_id']}" if s["job_id"] else ""
            print(f"RUNNING {s['label']} (attempt {s['attempts']}, {s['host']}{job})")
    for s in states:
        if s["state"] == "failed":
            print(f"FAILED {s['label']}: {s['reason']}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from bench.plugins import REGISTRIES
    from bench.profiles import PROFILES
    from bench.suites import builtin_suites

    load_builtins()
    kinds = [a.kind] if a.kind else list(REGISTRIES) + ["suites", "profiles"]
    for kind in kinds:
        if kind == "suites":
            print("suites:")
            for s in builtin_suites():
                print(f"  {s}")
            continue
        if kind == "profiles":
            print("profiles:")
            for name, p in PROFILES.items():
                print(f"  {name}: {p.resolution}px, models {p.models}")
            continue
        if kind not in REGISTRIES:
            raise ConfigError(f"bench list: unknown kind {kind!r}{did_you_mean(kind, list(REGISTRIES) + ['suites', 'profiles'])}")
        print(f"{kind}:")
        for name, cls in REGISTRIES[kind].items():
            reason = cls.unavailable_reason()
            status = f"  [unavailable: {reason}]" if reason else ""
            extra = ""
            if kind == "metrics":
                try:
                    extra = (f" -> {cls().protocol_id()}; {'higher' if cls.higher_is_better else 'lower'} is better "
                             f"for the defender; {cls.description}" + (f" [{cls.paper}]" if cls.paper else ""))
                except Exception as e:  # a metric whose defaults cannot build its id
                    extra = f" ({e})"
            elif kind == "defenses":
                extra = f" [{cls.defense_kind}]"
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"  {name} v{cls.version}{extra}{status}")
            if doc:
                print(f"      {doc}")
            params = describe_params(cls)
            if params:
                print(f"      params: {params}")
            if cls.profiles:
                print(f"      profile overrides: {cls.profiles}")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    """Exit 0 when the suite is well formed, whether or not it can run here (what is missing here is listed, with
    the fetch commands); 2 when it is not; 1 when a --data folder holds images a run cannot open."""
    from bench.runner import RunOptions, describe_plan, prepare

    prepared = prepare(RunOptions(suite=a.suite, profile=a.profile, data=_data_arg(a.data)), runnable=False)
    print(f"{a.suite}: valid (well formed)")
    print(describe_plan(prepared))
    if prepared.cannot_run:
        print(f"cannot run here at the {a.profile} profile (the suite is valid; fetch these first):")
        for reason in prepared.cannot_run:
            print(f"  {reason}")
    else:
        print(f"runs here at the {a.profile} profile: every plug-in module, weight and model is present")
    _warn(prepared.warnings)
    return _report_bad_inputs(prepared)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _report_bad_inputs(prepared) -> int:
    """Decode every image the plan's subjects would load; name each bad one on stderr. 1 if any (a run would fail
    the cells of those subjects), else 0."""
    from bench.datasets import image_problems

    problems = [p for subjects in prepared.subjects.values() for p in image_problems(subjects)]
    for p in problems:
        print(f"bad input: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} bad input(s): a run fails the cells of those subjects; fix or remove the files",
              file=sys.stderr)
    return 1 if problems else 0


def cmd_leaderboard(a: argparse.Namespace) -> int:
    from bench.leaderboard import compare_with_reference, leaderboard_frame, render_markdown
    from bench.results import RunResults, directions

    run = RunResults.open(Path(a.out), a.suite, a.profile)
    rows, worst = run.cells, directions(run.metric_info())
    suites = sorted({r["suite"] for r in rows})
    for s in suites:
        df = leaderboard_frame([r for r in rows if r["suite"] == s], worst)
        if a.reference:
            try:
                df = compare_with_reference(df, a.reference)
            except ValueError as e:
                raise ConfigError(f"--reference: {e}") from None
        print(render_markdown(df, s))
    if not suites:
        print("(no results)")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    """Score image folders with metric protocols (bench/score.py); CSV to --out or stdout, a summary on stderr."""
    import pandas as pd

    from bench.score import ALL, parse_metric, plan_jobs, score

    load_builtins()
    layout = None
    if a.subject_layout:
        name, _, root = a.subject_layout.partition("=")
        layout = (name.strip(), Path(root).expanduser() if root else None)
    metrics = [parse_metric(m, a.profile) for m in a.metric]
    jobs = plan_jobs(Path(a.images).expanduser(), Path(a.reference).expanduser() if a.reference else None, layout,
                     Path(a.clean).expanduser() if a.clean else None, a.class_noun)
    frame = pd.DataFrame(score(jobs, metrics, a.profile))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(a.out, index=False)
        print(f"per-image and per-subject scores: {a.out}", file=sys.stderr)
    else:
        frame.to_csv(sys.stdout, index=False)
    summary = frame[frame["image"] == ALL].drop(columns=["image"])
    print(summary.to_string(index=False), file=sys.stderr)
    return 0


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def cmd_compare(a: argparse.Namespace) -> int:
    """Paired test of two defenses over the same subjects, seeds, scenarios and attacks (bench/stats.py)."""
    from bench.leaderboard import compare_frame
    from bench.results import RunResults
    from bench.store import atomic_write_text

    run = RunResults.open(Path(a.out), a.suite, a.profile)
    better = {pid: m.higher_is_better for pid, m in run.metric_info().items()}
    if not run.suites():
        raise ConfigError(f"no results in {a.out}" + (f" for suite {a.suite}" if a.suite else ""))
    for s in run.suites():
        try:
            df = compare_frame([c for c in run.cells if c["suite"] == s], a.a, a.b, better)
        except ValueError as e:
            raise ConfigError(f"bench compare, suite {s}: {e}") from None
        path = Path(a.out) / "leaderboards" / f"{_safe_name(s)}.compare.{_safe_name(a.a)}.vs.{_safe_name(a.b)}.csv"
        atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))
        print(f"# {s}: {a.b} vs {a.a}\n")
        print("Paired over the same (subject, seed) cells: mean difference with its 95% cluster bootstrap interval "
              "over subjects and seeds, Wilcoxon signed-rank p, effect sizes Cohen's d_z and rank-biserial r. "
              "`better for defender` is set only where the interval excludes 0.\n")
        untested = sorted(set(df.metric[df.pairs == 0]))
        print(df[df.pairs > 0].to_markdown(index=False, floatfmt=".4g"))
        if untested:
            print(f"\nno finite pairs (NaN or inf in every cell; `bench leaderboard` says why): {', '.join(untested)}")
        print(f"\n(written to {path})\n")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from bench.report import write_report

    index = write_report(Path(a.out), Path(a.to) if a.to else None, a.suite, a.profile)
    print(f"report: {index}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    """Check every finished artifact of an output folder against its record (every file's size and sha256)."""
    from bench.store import ArtifactStore

    cache = Path(a.out) / "cache"
    if not cache.is_dir():
        raise ConfigError(f"no cache in {a.out}; run `bench run --out {a.out}` first")
    store = ArtifactStore(cache)
    found = store.finished()
    damaged = [(kind, name, reason) for kind, name in found if (reason := store.verify(kind, name, full=True))]
    for kind, name, reason in damaged:
        print(f"DAMAGED {kind}/{name}: {reason}")
        if a.fix:
            store.discard(kind, name)
    print(f"{len(found)} artifacts checked, {len(damaged)} damaged"
          + (" and deleted: the next `bench run` recomputes them and what depends on them" if a.fix and damaged else ""))
    return 1 if damaged and not a.fix else 0


def cmd_data(a: argparse.Namespace) -> int:
    from bench.datasets import verify_root

    bad = 0
    for name, root in _data_arg(a.data).items():
        try:
            report = verify_root(name, root)
        except ValueError as e:  # DataError: missing root, no manifest
            raise ConfigError(f"bench data verify {name}={root}: {e}") from None
        print(f"{name} at {root}: {report.checked} files checked, {len(report.missing)} missing, "
              f"{len(report.mismatched)} mismatched, {len(report.extra)} not in the manifest, "
              f"{len(report.optional_missing)} optional absent")
        for p in report.missing:
            print(f"  missing: {p}")
        for p, exp, got in report.mismatched:
            print(f"  sha256 mismatch: {p} (expected {exp[:12]}..., got {got[:12]}...)")
        for p in report.extra:
            print(f"  not in the manifest: {p}")
        for p in report.optional_missing:
            print(f"  optional, absent (not an error): {p}")
        problems = _decode_problems(name, root)
        for p in problems:
            print(f"  bad input: {p}")
        bad += 0 if report.ok and not problems else 1
    return 1 if bad else 0


def _decode_problems(name: str, root: Path) -> list[str]:
    """Every image of the dataset at ``root`` as a run would open it (``image_problems``)."""
    from bench.datasets import image_problems
    from bench.plugins import DATASETS

    load_builtins()
    try:
        return image_problems(DATASETS.create(name).subjects(root))
    except ValueError as e:  # DataError: layout, symlink out of the root
        return [str(e)]


def cmd_weights(a: argparse.Namespace) -> int:
    from bench import weights

    load_builtins()  # plug-in modules register the weights they need
    if a.weights_cmd == "list":
        print(f"weights root: {weights.weights_root()} (BENCH_WEIGHTS_DIR)")
        for name, w in sorted(weights.WEIGHTS.items()):
            reason = w.missing()
            where = w.hf_repo if w.kind == "hf" else str(w.folder())
            print(f"  {name} [{'present' if reason is None else 'missing'}] {w.kind}: {where}")
            print(f"      {w.what}; used by {w.used_by}" + (f"; license: {w.license}" if w.license else ""))
        return 0
    names = sorted(weights.WEIGHTS) if a.all else a.names
    if not names:
        raise ConfigError("bench weights fetch: name the weights (see `bench weights list`) or pass --all")
    failed = 0
    for name in names:
        try:
            w = weights.get(name)
        except KeyError as e:
            raise ConfigError(str(e).strip('"')) from None
        try:
            print(f"{name}: {w.fetch()}")
        except Exception as e:  # no internet, moved URL: say which one and go on with the rest
            print(f"{name}: fetch failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench", description="Anti-personalization benchmark harness")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a suite (resumes where an earlier run stopped)")
    r.add_argument("--suite", required=True, help="built-in suite name or path to a .yaml suite")
    r.add_argument("--profile", default="tiny", help="tiny (CPU plumbing, seconds), proxy (CPU, text-conditioned models where protection is measurable) or paper (real SD, GPU)")
    r.add_argument("--out", default="runs", help="output folder (cache, ledger, leaderboards)")
    r.add_argument("--data", action="append", metavar="NAME=PATH", help="dataset folder, e.g. vggface2=../shared/data/faces")
    r.add_argument("--executor", default="local", help="local (default) or slurm")
    r.add_argument("--executor-opt", action="append", metavar="KEY=VALUE",
                   help="executor parameter, e.g. partition=gpu timeout_min=600 (see `bench list executors`)")
    r.add_argument("--jobs", default=None, metavar="N",
                   help="stages in flight: local worker processes (default, or BENCH_JOBS: every core on CPU, one per "
                        "GPU; 1: one at a time in this process), Slurm jobs (default 256)")
    r.add_argument("--retries", type=int, default=2, metavar="N",
                   help="further attempts of a failed stage before its cells fail (bad input is never retried)")
    r.add_argument("--keep-weights", action="store_true",
                   help="keep fine-tuned weights after generation (default: delete them, keep their records)")
    r.add_argument("--device", default=None, help="override the profile's device (cpu, cuda, cuda:1)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (cells, unique vs naive stage executions)")
    r.add_argument("--allow-unsafe-weights", action="store_true", help="allow pickled (.bin/.ckpt) weights: they can run code")
    r.set_defaults(fn=cmd_run)

    ls = sub.add_parser("list", help="list plug-ins with parameters and availability")
    ls.add_argument("kind", nargs="?", help="defenses|attacks|transforms|metrics|datasets|scenarios|executors|suites|profiles")
    ls.set_defaults(fn=cmd_list)

    v = sub.add_parser("validate", help="check a suite and print its plan; runs nothing")
    v.add_argument("suite")
    v.add_argument("--profile", default="tiny")
    v.add_argument("--data", action="append", metavar="NAME=PATH")
    v.set_defaults(fn=cmd_validate)

    lb = sub.add_parser("leaderboard", help="print leaderboards from an output folder")
    lb.add_argument("--out", default="runs")
    lb.add_argument("--suite", default=None)
    lb.add_argument("--profile", default=None)
    lb.add_argument("--reference", default=None, help="paper reference table under leaderboards/ to compare with")
    lb.set_defaults(fn=cmd_leaderboard)

    sc = sub.add_parser("score", help="score image folders with metric protocols (no fine-tuning), per image and "
                                      "per subject, same protocol ids and numbers as a run")
    sc.add_argument("--metric", action="append", required=True,
                    help="metric name or a YAML mapping as in a suite, e.g. ism or '{name: ism, backend: insightface}'")
    sc.add_argument("--images", required=True, help="images to score (generated or protected, by the metric)")
    sc.add_argument("--reference", default=None, help="one subject: its reference images (every split)")
    sc.add_argument("--subject-layout", default=None, metavar="NAME=ROOT",
                    help="IMAGES/<subject id>/ per subject of dataset NAME at ROOT (e.g. vggface2=../shared/data/faces)")
    sc.add_argument("--clean", default=None,
                    help="clean originals of protected images, paired by file stem (default: the subject's set_B)")
    sc.add_argument("--class-noun", default="person", help="class noun of a --reference subject (face metrics: person)")
    sc.add_argument("--profile", default="paper", help="the profile whose metric settings apply (default paper)")
    sc.add_argument("--out", default=None, help="CSV file (default: stdout)")
    sc.set_defaults(fn=cmd_score)

    cp = sub.add_parser("compare", help="paired test of defense B against defense A over the same subjects and seeds")
    cp.add_argument("a", metavar="A", help="defense label as in the leaderboard, e.g. random-noise")
    cp.add_argument("b", metavar="B", help="defense label, e.g. aspl")
    cp.add_argument("--out", default="runs")
    cp.add_argument("--suite", default=None)
    cp.add_argument("--profile", default=None)
    cp.set_defaults(fn=cmd_compare)

    rp = sub.add_parser("report", help="write a self-contained HTML report (image grids, tables, plots, provenance)")
    rp.add_argument("--out", default="runs", help="the run folder")
    rp.add_argument("--to", default=None, help="report folder (default: OUT/report)")
    rp.add_argument("--suite", default=None)
    rp.add_argument("--profile", default=None)
    rp.set_defaults(fn=cmd_report)

    st = sub.add_parser("status", help="queued, running, done and failed stages of an output folder (from its ledger)")
    st.add_argument("--out", default="runs")
    st.set_defaults(fn=cmd_status)

    vf = sub.add_parser("verify", help="check every cached artifact of an output folder against its recorded hashes")
    vf.add_argument("--out", default="runs")
    vf.add_argument("--fix", action="store_true", help="delete damaged artifacts so that the next run recomputes them")
    vf.set_defaults(fn=cmd_verify)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dv = dsub.add_parser("verify", help="check dataset folders against data_manifests/")
    dv.add_argument("data", nargs="+", metavar="NAME=PATH")
    dv.set_defaults(fn=cmd_data)

    w = sub.add_parser("weights", help="pretrained weights that metrics need: list them, fetch them (needs internet)")
    wsub = w.add_subparsers(dest="weights_cmd", required=True)
    wl = wsub.add_parser("list", help="every known weights entry, present or missing, and where it is looked for")
    wl.set_defaults(fn=cmd_weights)
    wf = wsub.add_parser("fetch", help="download (and convert to safetensors) on a machine with internet access")
    wf.add_argument("names", nargs="*", metavar="NAME")
    wf.add_argument("--all", action="store_true", help="fetch every known entry")
    wf.set_defaults(fn=cmd_weights)
    return ap


COMPUTE_COMMANDS = ("run", "score", "weights")


def quiet_libraries() -> None:
    """Our progress bars only: silence library warnings and per-load progress bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def configure_threads() -> None:
    """Torch CPU threads: ``BENCH_CPU_THREADS`` (default 1). On our 2-vCPU machines torch's intra-op threading makes
    small convolutions 25x slower than one thread (conv2d fwd+bwd 64ch 16x16 bs8: 87 ms vs 3.4 ms); tiny-profile work is
    all small ops, and GPU runs do not depend on it."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad command lines
        return int(e.code or 0)
    if a.cmd in COMPUTE_COMMANDS:  # the others answer without importing torch or diffusers (bench/lazy.py)
        quiet_libraries()
        configure_threads()
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
