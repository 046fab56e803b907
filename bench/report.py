"""`bench report`: a self-contained static HTML report of a run folder (``index.html`` + ``img/`` + ``plots/``; no
network at view time): per dataset x defense an image grid (clean | protected | amplified difference | the
attacker's generations per scenario and attack), the leaderboards as sortable tables, matplotlib plots (each metric
against scenario, protection effect against imperceptibility with its Pareto frontier, each metric against the
budget where a suite sweeps one) and the run's provenance (code revision, package versions, model weight hashes,
protocol ids with their meaning)."""
from __future__ import annotations

import html
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from bench.images import load_png, save_png
from bench.leaderboard import BASELINE, LEGEND, formatted, leaderboard_frame, metric_columns
from bench.registry import ConfigError
from bench.results import MetricInfo, RunResults, directions

MARKER = ".bench-report"  # a folder holding it was written here and may be replaced
THUMBS = 4  # images per grid row
AMPLIFY = 10  # the difference image shows |protected - clean| x AMPLIFY
IMPERCEPTIBILITY_ORDER = ["lpips", "ssim", "psnr", "linf"]  # the frontier's x axis: the first one the run measured

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1600px}
h1,h2,h3{font-weight:600}table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
table.sortable th{cursor:pointer;background:#f3f3f3}table.sortable th:hover{background:#e5e5e5}
.grid{margin:.3em 0 1.2em}.row{display:flex;align-items:center;gap:4px;margin:2px 0}
.row .lab{width:260px;font-size:12px;flex:none;overflow-wrap:anywhere}.row img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ddd}
.note{color:#666;font-size:12px}figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:12px;max-width:480px}
code{font-size:12px}"""

SORT_JS = """document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, i) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("data-order") !== "asc";
      th.setAttribute("data-order", asc ? "asc" : "desc");
      var key = function (row) {
        var cell = row.cells[i], v = cell.getAttribute("data-sort");
        if (v === null) { v = cell.textContent; }
        var x = parseFloat(v);
        return isNaN(x) ? v : x;
      };
      var body = table.tBodies[0];
      Array.prototype.slice.call(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1);
      }).forEach(function (r) { body.appendChild(r); });
    });
  });
});"""


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _prepare(to: Path) -> Path:
    if to.exists() and any(to.iterdir()) and not (to / MARKER).is_file():
        raise ConfigError(f"--to {to}: a non-empty folder that is not a bench report; pick an empty or new folder")
    if to.exists():
        shutil.rmtree(to)
    for sub in ("img", "plots"):
        (to / sub).mkdir(parents=True)
    (to / MARKER).write_text("written by `bench report`; replaced by the next one\n")
    return to


class _Images:
    """Copies or writes images into ``img/`` once, returning their relative paths."""

    def __init__(self, to: Path) -> None:
        self.to = to
        self.done: set[str] = set()

    def copy(self, src: Path, name: str) -> str:
        rel = f"img/{name}"
        if rel not in self.done:
            shutil.copyfile(src, self.to / rel)
            self.done.add(rel)
        return rel

    def write(self, image: np.ndarray, name: str) -> str:
        rel = f"img/{name}"
        if rel not in self.done:
            save_png(image, self.to / rel)
            self.done.add(rel)
        return rel


def _row(label: str, srcs: list[str], note: str = "") -> str:
    imgs = "".join(f'<img src="{esc(s)}" alt="{esc(label)}">' for s in srcs)
    extra = f'<span class="note">{esc(note)}</span>' if note else ""
    return f'<div class="row"><span class="lab">{esc(label)}</span>{imgs}{extra}</div>'


def _clean_images(run: RunResults, protect: str) -> list[np.ndarray]:
    from bench.stages import subject_from_spec

    p = run.records[protect]["params"]
    spec = p["subject"] if "subject" in p else p["subjects"][0]
    return subject_from_spec(spec).load("B", p["resolution"])[:THUMBS]


def grid_html(run: RunResults, cells: list[dict], imgs: _Images) -> str:
    """Per dataset x defense: one subject's (the first, seed of the first cell) clean, protected and difference
    images, then the attacker's generations for every scenario x attack."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        by[(c["dataset"], c["defense"])].append(c)
    parts = []
    for (ds, defense), group in sorted(by.items()):
        first = min(group, key=lambda c: (c["subject"], c["seed"]))
        mine = sorted((c for c in group if (c["subject"], c["seed"]) == (first["subject"], first["seed"])),
                      key=lambda c: (c["scenario"], c["attack"]))
        rows = []
        protect = run.protect_of(first)
        if protect is None:
            rows.append(_row("protected", [], "no protect stage recorded for this cell"))
        else:
            pdir, tag = run.path(protect), protect[:12]
            try:
                clean = _clean_images(run, protect)
                rows.append(_row("clean (set_B)", [imgs.write(im, f"clean-{tag}-{i}.png") for i, im in enumerate(clean)]))
            except Exception as e:  # data folder moved or absent: say so, show the rest
                clean = []
                rows.append(_row("clean (set_B)", [], f"clean images unavailable: {type(e).__name__}: {e}"))
            files = sorted((pdir / "images").glob("*.png"))[:THUMBS]
            if files:
                rows.append(_row("protected (published)", [imgs.copy(f, f"prot-{tag}-{f.name}") for f in files]))
                if clean:
                    diffs = [np.clip(np.abs(load_png(f).astype(np.int16) - c.astype(np.int16)) * AMPLIFY, 0, 255)
                             .astype(np.uint8) for f, c in zip(files, clean)]
                    rows.append(_row(f"|protected - clean| x {AMPLIFY}",
                                     [imgs.write(d, f"diff-{tag}-{i}.png") for i, d in enumerate(diffs)]))
            else:
                rows.append(_row("protected (published)", [], "the owners publish the clean photos "
                                                               "(a harden defense protects the model)"))
        for c in mine:
            label = f"generated: {c['scenario']} / {c['attack']}"
            if c["status"] != "ok":
                rows.append(_row(label, [], f"failed: {c['reason']}"))
                continue
            gen = run.generate_of(c)
            if gen is None:
                rows.append(_row(label, [], "no generate stage recorded"))
                continue
            files = sorted((run.path(gen) / "images").glob("*.png"))
            step = max(1, len(files) // THUMBS)
            picked = files[::step][:THUMBS]
            rows.append(_row(label, [imgs.copy(f, f"gen-{gen[:12]}-{f.name}") for f in picked]))
        parts.append(f'<h3>{esc(ds)} &middot; {esc(defense)}</h3><p class="note">subject {esc(first["subject"])}, '
                     f'seed {esc(first["seed"])}</p><div class="grid">{"".join(rows)}</div>')
    return "".join(parts)


def table_html(df: pd.DataFrame, info: dict[str, MetricInfo]) -> str:
    shown, rows, notes = formatted(df)
    head = []
    for c in shown:
        m = info.get(c)
        title = f"{'higher' if m.higher_is_better else 'lower'} is better for the defender; {m.description}" if m else c
        arrow = (" &uarr;" if m.higher_is_better else " &darr;") if m else ""
        head.append(f'<th title="{esc(title)}">{esc(c)}{arrow}</th>')
    body = []
    for r in rows:
        tds = []
        for c in shown:
            text, value = r[c]
            sort = ""
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                sort = f' data-sort="{esc("" if math.isnan(value) else repr(float(value)))}"'
            tds.append(f"<td{sort}>{esc(text)}</td>")
        body.append(f"<tr>{''.join(tds)}</tr>")
    foot = "".join(f"<li>({k}) {esc(n)}</li>" for n, k in notes.items())
    return (f'<table class="sortable"><thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<p class="note">Notes:</p><ul class="note">{foot}</ul>' if foot else ""))


# ---------------------------------------------------------------- plots

def _figure(width: float = 6.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height), dpi=80)


def _save(plt, fig, to: Path, name: str, caption: str) -> str:
    fig.tight_layout()
    fig.savefig(to / "plots" / name)
    plt.close(fig)
    return f'<figure><img src="plots/{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def _short(pid: str) -> str:
    return pid.split("/")[0]


def _finite(df: pd.DataFrame, col: str) -> bool:
    return col in df and np.isfinite(pd.to_numeric(df[col], errors="coerce")).any()


def plots_html(df: pd.DataFrame, cells: list[dict], info: dict[str, MetricInfo], to: Path, tag: str) -> str:
    figs = []
    metrics = [m for m in metric_columns(df) if _finite(df, m)]
    effects = [m for m in metrics if info.get(m) is None or info[m].target != "protected"]
    imperceptible = sorted((m for m in metrics if info.get(m) is not None and info[m].target == "protected"),
                           key=lambda m: IMPERCEPTIBILITY_ORDER.index(info[m].name)
                           if info[m].name in IMPERCEPTIBILITY_ORDER else len(IMPERCEPTIBILITY_ORDER))
    for i, (ds, d) in enumerate(df.groupby("dataset", sort=True)):
        xs = sorted({(s, a) for s, a in zip(d.scenario, d.attack)})
        xlabels = [s if len({a for _, a in xs}) == 1 else f"{s}\n{a}" for s, a in xs]
        defenses = sorted(set(d.defense))
        for j, m in enumerate(effects + imperceptible):
            plt, (fig, ax) = _figure(max(5.0, 1.1 * len(xs) + 3), 3.6)
            width = 0.8 / len(defenses)
            for k, defense in enumerate(defenses):
                rows = d[d.defense == defense].set_index(["scenario", "attack"])
                y = np.array([rows.loc[x, m] if x in rows.index else np.nan for x in xs], dtype=float)
                lo = np.array([rows.loc[x, f"{m} ci_low"] if x in rows.index else np.nan for x in xs], dtype=float)
                hi = np.array([rows.loc[x, f"{m} ci_high"] if x in rows.index else np.nan for x in xs], dtype=float)
                y = np.where(np.isfinite(y), y, np.nan)
                at = np.arange(len(xs)) + k * width
                ax.bar(at, y, width, label=defense)
                ax.vlines(at, lo, hi, colors="k", linewidths=0.8)  # the 95% interval (NaN: none drawn)
            ax.set_xticks(np.arange(len(xs)) + width * (len(defenses) - 1) / 2, xlabels, fontsize=7)
            m_info = info.get(m)
            ax.set_ylabel(_short(m) + ("" if m_info is None else (" (higher better)" if m_info.higher_is_better
                                                                 else " (lower better)")), fontsize=8)
            ax.legend(fontsize=6)
            figs.append(_save(plt, fig, to, f"{tag}-d{i}-scenario-{j}.png",
                              f"{ds}: {m} per scenario / bypass (bars: mean; whiskers: 95% bootstrap interval)"))
        if imperceptible and effects:
            x_m = imperceptible[0]
            for j, m in enumerate(effects):
                figs.append(_frontier(d, x_m, m, info, to, f"{tag}-d{i}-frontier-{j}.png", ds))
        figs.extend(_budget_plots(ds, cells, effects + imperceptible, info, to, f"{tag}-d{i}"))
    return "".join(f for f in figs if f)


def _frontier(d: pd.DataFrame, x_m: str, y_m: str, info: dict[str, MetricInfo], to: Path, name: str, ds: str) -> str:
    """Protection effect (y) against imperceptibility (x) per defense, first scenario and attack; the Pareto
    frontier joins the defenses no other beats on both (directions for the defender)."""
    first = sorted({(s, a) for s, a in zip(d.scenario, d.attack)})[0]
    rows = d[(d.scenario == first[0]) & (d.attack == first[1])]
    pts = [(r.defense, float(r[x_m]), float(r[y_m])) for _, r in rows.iterrows()
           if np.isfinite(r[x_m]) and np.isfinite(r[y_m])]
    if not pts:
        return ""
    sx = 1 if info[x_m].higher_is_better else -1
    sy = 1 if (info.get(y_m) is None or info[y_m].higher_is_better) else -1
    front = [p for p in pts if not any(sx * q[1] >= sx * p[1] and sy * q[2] >= sy * p[2] and (q[1], q[2]) != (p[1], p[2])
                                       for q in pts)]
    plt, (fig, ax) = _figure(5.0, 3.8)
    for label, x, y in pts:
        ax.scatter([x], [y], s=18)
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front.sort(key=lambda p: p[1])
    ax.plot([p[1] for p in front], [p[2] for p in front], "k--", lw=0.8, label="Pareto frontier")
    ax.set_xlabel(f"{_short(x_m)} ({'higher' if sx > 0 else 'lower'} = less visible)", fontsize=8)
    ax.set_ylabel(f"{_short(y_m)} ({'higher' if sy > 0 else 'lower'} = better protection)", fontsize=8)
    ax.legend(fontsize=6)
    left = sorted({r.defense for _, r in rows.iterrows()} - {p[0] for p in pts})
    caption = (f"{ds}, {first[0]} / {first[1]}: protection ({y_m}) against imperceptibility ({x_m})"
               + (f"; not plotted (value not finite): {', '.join(left)}" if left else ""))
    return _save(plt, fig, to, name, caption)


def _budget(cell: dict) -> tuple[str, float] | None:
    """(defense plug-in name, its L-inf budget in /255) of a cell, or None when it declares none."""
    from bench.plugins import DEFENSES

    spec = cell["provenance"].get("config", {}).get("defense")
    if not spec:
        return None
    try:
        budget = DEFENSES.get(spec["name"])(DEFENSES.get(spec["name"]).Params(**spec["params"])).budget_255()
    except Exception:  # a plug-in no longer installed or whose parameters changed: no budget axis for it
        return None
    return None if budget is None else (spec["name"], float(budget))


def _budget_plots(ds: str, cells: list[dict], metrics: list[str], info, to: Path, tag: str) -> list[str]:
    """Metric against the L-inf budget for every defense the suite runs at two or more budgets (``none`` at 0)."""
    ok = [c for c in cells if c["dataset"] == ds and c["status"] == "ok"]
    budgets = {c["defense"]: b for c in ok if (b := _budget(c)) is not None}
    names = {n for n, _ in budgets.values()}
    swept = {n for n in names if len({b for m, b in budgets.values() if m == n}) >= 2}
    figs = []
    for n in sorted(swept):
        for j, m in enumerate(metrics):
            plt, (fig, ax) = _figure(5.0, 3.4)
            plotted = False
            for sc in sorted({c["scenario"] for c in ok}):
                pts: dict[float, list[float]] = defaultdict(list)
                for c in ok:
                    if c["scenario"] != sc or m not in c["metrics"]:
                        continue
                    b = 0.0 if c["defense"] == BASELINE else budgets.get(c["defense"], (None, None))[1]
                    if (c["defense"] == BASELINE or budgets.get(c["defense"], ("",))[0] == n) and b is not None:
                        v = float(c["metrics"][m]) if c["metrics"][m] is not None else math.nan
                        if math.isfinite(v):
                            pts[b].append(v)
                if len(pts) >= 2:
                    xs = sorted(pts)
                    mean, sd = np.array([np.mean(pts[x]) for x in xs]), np.array([np.std(pts[x]) for x in xs])
                    ax.plot(xs, mean, marker="o", label=sc)
                    ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2)
                    plotted = True
            if not plotted:
                plt.close(fig)
                continue
            ax.set_xlabel(f"{n} L-inf budget (/255; {BASELINE} at 0)", fontsize=8)
            ax.set_ylabel(_short(m), fontsize=8)
            ax.legend(fontsize=6)
            figs.append(_save(plt, fig, to, f"{tag}-budget-{n}-{j}.png",
                              f"{ds}: {m} against {n}'s budget (mean and std over subjects and seeds)"))
    return figs


# ---------------------------------------------------------------- provenance

def provenance_html(run: RunResults, cells: list[dict], info: dict[str, MetricInfo]) -> str:
    revs = sorted({c["provenance"].get("code_rev", "") for c in cells})
    versions = next((c["provenance"].get("versions") for c in cells if c["provenance"].get("versions")), {})
    weights: dict[str, dict] = {}
    for c in cells:
        weights.update(c["provenance"].get("weights_sha256", {}))
    summary = run.out / "summary.json"
    parts = [f"<p>Code revision(s): {', '.join(f'<code>{esc(r)}</code>' for r in revs)}; suites and profiles: "
             + ", ".join(f"{esc(s)} ({esc(p)})" for s, p in sorted({(c['suite'], c['profile']) for c in cells}))
             + "</p>"]
    if versions:
        parts.append("<p>Packages: " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in sorted(versions.items())) + "</p>")
    if summary.is_file():
        s = json.loads(summary.read_text())
        parts.append(f"<p>Last `bench run`: suite {esc(s.get('suite'))}, cells ok {esc(s.get('cells_ok'))}/"
                     f"{esc(s.get('cells_total'))}, stages run {esc(s.get('stages_run'))}, cached "
                     f"{esc(s.get('stages_cached'))}, device {esc(s.get('device'))}</p>")
    rows = "".join(f"<tr><td>{esc(ref)}</td><td>{esc(comp)}</td><td><code>{esc(h)}</code></td></tr>"
                   for ref, comps in sorted(weights.items()) for comp, h in sorted(comps.items()))
    parts.append('<h3>Model weights (sha256)</h3><table class="sortable"><thead><tr><th>model</th><th>component</th>'
                 f"<th>sha256</th></tr></thead><tbody>{rows}</tbody></table>")
    used = sorted({pid for c in cells for pid in c["metrics"]})
    rows = "".join(
        f"<tr><td><code>{esc(pid)}</code></td><td>{esc(info[pid].name) if pid in info else ''}</td>"
        f"<td>{('higher' if info[pid].higher_is_better else 'lower') if pid in info else '?'}</td>"
        f"<td>{esc(info[pid].description) if pid in info else 'metric record not in the cache'}</td>"
        f"<td>{esc(info[pid].paper) if pid in info else ''}</td></tr>" for pid in used)
    parts.append('<h3>Protocol ids</h3><table class="sortable"><thead><tr><th>protocol id (column)</th><th>metric</th>'
                 f"<th>better for the defender</th><th>meaning</th><th>source</th></tr></thead><tbody>{rows}</tbody></table>")
    defenses = {c["defense"]: c["provenance"].get("config", {}).get("defense", {}) for c in cells}
    scenarios = {c["scenario"]: c["provenance"].get("config", {}).get("scenario", {}) for c in cells}
    attacks = {c["attack"]: c["provenance"].get("config", {}).get("attack", {}) for c in cells}
    for title, items in (("Defenses", defenses), ("Scenarios", scenarios), ("Attacks", attacks)):
        rows = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(json.dumps(v, sort_keys=True))}</code></td></tr>"
                       for k, v in sorted(items.items()))
        parts.append(f"<h3>{title}</h3><table><thead><tr><th>label</th><th>configuration</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts)


def write_report(out: Path, to: Path | None = None, suite: str | None = None, profile: str | None = None) -> Path:
    """Write the report of run folder ``out`` into ``to`` (default ``out/report``); returns its index.html."""
    run = RunResults.open(out, suite, profile)
    if not run.cells:
        raise ConfigError(f"no results in {out}" + (f" for suite {suite}" if suite else ""))
    to = _prepare(to or Path(out) / "report")
    info = run.metric_info()
    imgs = _Images(to)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in run.cells:
        groups[(c["suite"], c["profile"])].append(c)
    body = []
    toc = []
    for i, ((s, p), cells) in enumerate(sorted(groups.items())):
        df = leaderboard_frame(cells, directions(info))
        anchor = f"s{i}"
        toc.append(f'<li><a href="#{anchor}">{esc(s)} ({esc(p)})</a></li>')
        body.append(f'<h2 id="{anchor}">{esc(s)} <span class="note">profile {esc(p)}, {len(cells)} cells</span></h2>'
                    f"<h3>Leaderboard</h3><p class=\"note\">{esc(LEGEND)} Click a column to sort.</p>"
                    f"{table_html(df, info)}<h3>Plots</h3>{plots_html(df, cells, info, to, anchor)}"
                    f"<h3>Images</h3>{grid_html(run, cells, imgs)}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bench report: {esc(out)}</title>'
            f"<style>{CSS}</style></head><body><h1>Benchmark report</h1><p class=\"note\">Run folder "
            f"<code>{esc(Path(out).resolve())}</code>; written by <code>bench report</code>.</p><ul>{''.join(toc)}"
            f'<li><a href="#provenance">provenance</a></li></ul>{"".join(body)}<h2 id="provenance">Provenance</h2>'
            f"{provenance_html(run, run.cells, info)}<script>{SORT_JS}</script></body></html>")
    index = to / "index.html"
    index.write_text(page)
    return index
