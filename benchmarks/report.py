"""The run's artefacts: ``results.json`` (everything), ``results.md`` (tables), PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.accuracy import LABELS, METHODS

PLOTS = {
    "accuracy": "accuracy_vs_iterations.png",
    "recovery": "recovery_agreement.png",
    "batched": "batched_speedup.png",
    "scaling": "scaling_memory.png",
}


def _pct(r: dict | None) -> str:
    if not r:
        return "n/a"
    return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}"


def _f(x: Any, nd: int = 2, suffix: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}{suffix}"
    return f"{x}{suffix}"


def run_record(doc: dict) -> dict:
    """What a section that writes its own NAME.json / NAME.md carries of the run: a time budget or a
    seconds ratio means little without the machine and its load."""
    m = doc["machine"]
    return {"command": doc["command"], "started": doc["started"], "preset": doc["preset"],
            "commit": (doc.get("git") or {}).get("commit"),
            "machine": {k: m.get(k) for k in ("cpu", "cpu_cores", "memory_gib", "gpu", "device", "torch",
                                              "torch_threads", "load_average_start", "load_average_end")}}


def run_lines(sec: dict) -> list[str]:
    """The Markdown lines of :func:`run_record` (none without it)."""
    r = sec.get("run")
    if not r:
        return []
    m = r["machine"]
    return [f"- command: `{r['command']}` (started {r['started']}, commit `{(r.get('commit') or '?')[:12]}`)",
            f"- machine: {m['cpu']} ({m['cpu_cores']} cores, {m['memory_gib']} GiB), GPU: {m['gpu'] or 'none'}; "
            f"device `{m['device']}`, {m['torch_threads']} torch thread(s), torch {m['torch']}; load average "
            f"{m['load_average_start']} at start, {m['load_average_end']} at end", ""]


# ---------------------------------------------------------------------------------------- targets

def targets(doc: dict) -> list[dict]:
    s = doc["sections"]
    out = []
    rec = s.get("recovery") or {}
    if rec and "error" not in rec:
        t09 = (rec.get("targets") or {}).get("0.9") or {}
        op = rec.get("operating_point") or {}
        for label, val in (("recovery speed-up, steps to agreement 0.9 (scratch / FIVE)", t09.get("steps_ratio")),
                           ("recovery speed-up, seconds to agreement 0.9 (scratch / FIVE)", t09.get("seconds_ratio")),
                           (f"recovery speed-up at FIVE's k={op.get('k')}-step agreement, steps", op.get("steps_ratio")),
                           (f"recovery speed-up at FIVE's k={op.get('k')}-step agreement, seconds", op.get("seconds_ratio"))):
            out.append({"target": label, "goal": ">= 20x (stretch 30x)", "measured": val,
                        "met": None if val is None else val >= 20})
    bat = s.get("batched") or {}
    if bat and "error" not in bat:
        for row in bat.get("rows", []):
            if row["T"] == 16:
                gpu = bat.get("device", "cpu").startswith("cuda")
                out.append({"target": f"batched inversion speed-up at T=16 ({bat.get('device')})",
                            "goal": ">= 3x on GPU" if gpu else ">= 3x on GPU (CPU: reported only)",
                            "measured": row["speedup"], "met": (row["speedup"] >= 3) if gpu else None})
        f64 = bat.get("float64_max_abs_diff") or {}
        worst = max((f64.get(k, 0.0) for k in ("images", "last_grads", "generator")), default=None)
        out.append({"target": "batched == sequential, float64, one FIVE step (max abs difference)",
                    "goal": "rounding level (< 1e-9)", "measured": worst,
                    "met": None if worst is None else worst < 1e-9})
    sc = s.get("scaling") or {}
    if sc and "error" not in sc:
        val = sc.get("peak_ratio_largest_vs_smallest")
        sizes = [r["size"] for r in sc.get("rows", [])]
        out.append({"target": f"peak RSS at {sizes[-1] if sizes else '?'} models / at {sizes[0] if sizes else '?'}",
                    "goal": "<= 1.2", "measured": val, "met": None if val is None else val <= 1.2})
    if doc.get("preset") == "quick" and doc.get("complete_preset", True):
        w = doc.get("wall_s")
        out.append({"target": "quick preset wall time (s)", "goal": "< 1800 s on 2 CPU cores",
                    "measured": w, "met": None if w is None else w < 1800})
    return out


# --------------------------------------------------------------------------------------- markdown

def markdown(doc: dict) -> str:
    s = doc["sections"]
    m = doc["machine"]
    L: list[str] = [f"# free-dfml benchmarks: preset `{doc['preset']}`", ""]
    L += [f"- command: `{doc['command']}`",
          f"- machine: {m.get('cpu')} ({m.get('cpu_cores')} cores, {m.get('memory_gib')} GiB), "
          f"GPU: {m.get('gpu') or 'none'}; device `{m.get('device')}`; torch {m.get('torch')}, "
          f"python {m.get('python')}",
          f"- workers: {doc['settings']['workers']} process(es) x {doc['settings']['threads_per_worker'] or 'default'} "
          "torch thread(s)",
          f"- load average (1/5/15 min) at start {m.get('load_average_start')}, at end {m.get('load_average_end')}",
          f"- code: commit `{(doc.get('git') or {}).get('commit', '?')[:12]}`"
          + (f", with uncommitted changes in {', '.join((doc.get('git') or {}).get('modified') or [])}"
             if (doc.get('git') or {}).get('modified') else ""),
          f"- seed {doc['seed']}, data `{doc['settings']['study']['data']['dataset']}` at "
          f"{doc['settings']['study']['data']['image_size']} px; "
          f"started {doc['started']}, wall time {doc['wall_s']:.0f} s"]
    if doc.get("overrides"):
        L.append("- preset fields overridden: " + ", ".join(f"`{k}` = `{json.dumps(v)}`"
                                                           for k, v in doc["overrides"].items()))
    L.append("")
    tg = doc.get("targets") or []
    if tg:
        L += ["## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in tg:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            meas = t["measured"]
            meas = f"{meas:.3g}" if isinstance(meas, float) else _f(meas)
            L.append(f"| {t['target']} | {t['goal']} | {meas} | {met} |")
        L.append("")
    acc = s.get("accuracy")
    if acc:
        p = acc.get("protocol", {})
        z = acc.get("zoo", {})
        L += ["## 1. Accuracy", "",
              f"Meta-test split, {p.get('episodes')} episodes per setting, {p.get('way')}-way, 15 queries a "
              f"class, 10 adaptation steps, same inner lr and same episodes (seed {p.get('eval_seed')}) for every "
              f"method; mean ± 95% interval. Zoo: {z.get('models')} Conv4 client models over {z.get('classes')} "
              f"meta-train classes (mean client held-out accuracy {_f(z.get('mean_client_holdout_accuracy'), 3)}).",
              "", "| method | 5-way 1-shot (%) | 5-way 5-shot (%) | train s | eval s | inversion s | replay meta-batches |",
              "|---|---|---|---|---|---|---|"]
        for name in METHODS:
            r = acc["methods"].get(name)
            if r is None:
                if name in acc.get("errors", {}):
                    L.append(f"| {name} | failed | failed | | | | |")
                continue
            res = r["results"]
            L.append(f"| {name} | {_pct(res.get('1shot'))} | {_pct(res.get('5shot'))} | {r['train_s']:.1f} | "
                     f"{r['eval_s']:.1f} | {_f(r.get('inversion_s'), 1)} | "
                     f"{_f(r.get('replay_batches', r.get('meta_batches')))} |")
        L += ["", "Methods: " + "; ".join(f"`{k}`: {v}" for k, v in LABELS.items()) + ".", ""]
        if (Path(doc["out"]) / PLOTS["accuracy"]).exists():
            L += [f"![accuracy vs iterations]({PLOTS['accuracy']})", ""]
    rec = s.get("recovery")
    if rec:
        L += ["## 2. Recovery speed", ""]
        if "error" in rec:
            L += ["failed:", "```", rec["error"][-2000:], "```", ""]
        else:
            L += [f"Held-out zoo models: {rec['models']}. Agreement = share of generated images the teacher "
                  f"gives their target class with confidence >= {rec['confidence']}. FIVE = the meta-generator "
                  f"FREE trained (recorded up to {rec['five_steps_max']} steps), scratch = a fresh generator "
                  f"(up to {rec['scratch_steps_max']} steps); same latents, targets, optimiser.", "",
                  "| agreement | models reached (FIVE / scratch) | FIVE steps | scratch steps | steps ratio | "
                  "FIVE s | scratch s | seconds ratio |", "|---|---|---|---|---|---|---|---|"]
            for tgt, t in rec["targets"].items():
                L.append(f"| {tgt} | {t['models_reached_five']} / {t['models_reached_scratch']} | "
                         f"{_f(t['five_steps_mean'], 1)} | {_f(t['scratch_steps_mean'], 1)} | "
                         f"{_f(t['steps_ratio'], 1, 'x')} | {_f(t['five_s_mean'], 3)} | {_f(t['scratch_s_mean'], 3)} | "
                         f"{_f(t['seconds_ratio'], 1, 'x')} |")
            op = rec["operating_point"]
            L += ["", f"FIVE's operating point: after k = {op['k']} steps the agreement is "
                  f"{_f(op['five_agreement_mean'], 3)} (mean); a scratch generator reaches the same agreement on "
                  f"{op['models_scratch_reached']}/{rec['models']} models, after {_f(op['scratch_steps_mean'], 1)} "
                  f"steps on average: {_f(op['steps_ratio'], 1, 'x')} the steps, {_f(op['seconds_ratio'], 1, 'x')} "
                  f"the seconds. Scratch agreement after {rec['scratch_steps_max']} steps: "
                  f"{_f(op['scratch_final_agreement_mean'], 3)}.", ""]
            if (Path(doc["out"]) / PLOTS["recovery"]).exists():
                L += [f"![agreement vs steps]({PLOTS['recovery']})", ""]
    bat = s.get("batched")
    if bat:
        L += ["## 3. Batched multi-teacher inversion", ""]
        if "error" in bat:
            L += ["failed:", "```", bat["error"][-2000:], "```", ""]
        else:
            L += [f"One FIVE step (k = {bat['inner_steps']} inner steps, {bat['images_per_teacher']} images per "
                  f"teacher, generator nz {bat['generator']['nz']} ngf {bat['generator']['ngf']}, "
                  f"{bat['teacher']} teachers, L_adv on) on `{bat['device']}` with {bat['threads']} thread(s): "
                  "the sequential loop (the `loop` engine) against the `grouped` engine (networks run as "
                  f"`{bat.get('engine', 'vmap')}`) and, where measured, the `vmap` engine "
                  "(`server/inversion_engine.py`), same seeds.",
                  "", "| T | sequential s | batched s | speed-up | vmap s | vmap speed-up | max abs diff images | "
                  "max abs diff grads | peak RSS seq / batched MB |", "|---|---|---|---|---|---|---|---|---|"]
            for r in bat["rows"]:
                d = r["max_abs_diff"]
                L.append(f"| {r['T']} | {r['sequential_s']:.3f} | {r['batched_s']:.3f} | {r['speedup']:.2f}x | "
                         f"{_f(r.get('vmap_s'), 3)} | {_f(r.get('vmap_speedup'), 2, 'x')} | "
                         f"{d['images']:.2e} | {d['last_grads']:.2e} | {_f(r.get('sequential_peak_rss_mb'), 0)} / "
                         f"{_f(r.get('batched_peak_rss_mb'), 0)} |")
            f64 = bat.get("float64_max_abs_diff")
            if f64:
                v64 = bat.get("float64_max_abs_diff_vmap")
                vtxt = (f" (`vmap` engine: {max(v64[k] for k in ('images', 'last_grads', 'generator')):.1e} at most)"
                        if v64 else "")
                L += ["", f"float64, 4 teachers, one step: max abs difference images {f64['images']:.1e}, "
                      f"gradients {f64['last_grads']:.1e}, meta-updated generator {f64['generator']:.1e}{vtxt}. "
                      "float32 differences above that: the two code paths round differently (~1e-7), which flips "
                      "near-tied max-pool winners, ReLU kinks and L_adv's argmax-agreement mask; the gradient "
                      "of a piecewise-linear teacher changes discontinuously there and Adam carries it on. "
                      "Both are valid float32 results."]
            L.append("")
            if (Path(doc["out"]) / PLOTS["batched"]).exists():
                L += [f"![batched speed-up]({PLOTS['batched']})", ""]
    het = s.get("hetero")
    if het:
        L += ["## 4. Heterogeneous zoos", ""]
        for plan, e in het.items():
            z = e.get("zoo", {})
            mix = ", ".join(f"{k} x{v}" for k, v in (z.get("mix") or {}).items())
            L += [f"**{plan}** zoo: {z.get('models')} models ({mix}); mean client held-out accuracy "
                  f"{_f(z.get('mean_client_holdout_accuracy'), 3)}.", ""]
            shots = sorted({k for r in e["methods"].values() for k in r["results"]})
            L += ["| method | " + " | ".join(f"5-way {k.replace('shot', '-shot')} (%)" for k in shots)
                  + " | train s |", "|---|" + "---|" * (len(shots) + 1)]
            for name, r in e["methods"].items():
                L.append(f"| {name} | " + " | ".join(_pct(r["results"].get(k)) for k in shots)
                         + f" | {r['train_s']:.1f} |")
            for name, err in e.get("errors", {}).items():
                L.append(f"| {name} | failed | |")
            L.append("")
    sc = s.get("scaling")
    if sc:
        L += ["## 5. Scaling with the zoo size", ""]
        if "error" in sc:
            L += ["failed:", "```", sc["error"][-2000:], "```", ""]
        else:
            L += ["Each size in a fresh process: ingest through `Zoo.add`, then FREE iterations with a "
                  f"bounded teacher cache ({sc['rows'][0]['teacher_cache']} models).", "",
                  "| models | ingest s | ms / model | peak RSS ingest MB | peak RSS train MB | s / iteration | "
                  "teacher loads | bank MB (bound) | bank keys evicted | unbounded bank, every model visited, MB "
                  "| disk MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in sc["rows"]:
                L.append(f"| {r['size']} | {r['ingest_s']:.1f} | {r['ingest_ms_per_model']:.1f} | "
                         f"{r['peak_rss_ingest_mb']:.0f} | {r['peak_rss_train_mb']:.0f} | {r['s_per_iteration']:.3f} | "
                         f"{r['teacher_loads']} | {r['bank_mb']:.1f} ({r.get('bank_bound_mb', 'n/a')}) | "
                         f"{r.get('bank_evicted_keys', 'n/a')} | {r.get('bank_mb_unbounded_all_visited', 'n/a')} | "
                         f"{r['disk_mb']:.1f} |")
            L += ["", f"Peak RSS, largest / smallest zoo: {sc['peak_ratio_largest_vs_smallest']:.3f} "
                  f"(training phase: {sc['train_peak_ratio_largest_vs_smallest']:.3f}); seconds per iteration "
                  f"ratio {sc['s_per_iteration_ratio']:.2f}. Teachers stay on disk behind the LRU cache, and the "
                  "memory bank stays under `bank_max_mb` (set small here so that the bound is exercised: the "
                  "keys written to longest ago are evicted). Without the bound the bank would grow with the "
                  "number of models visited (the column before last: every model visited).", ""]
            if (Path(doc["out"]) / PLOTS["scaling"]).exists():
                L += [f"![memory vs zoo size]({PLOTS['scaling']})", ""]
    if doc.get("job_errors"):
        L += ["## Failed jobs", ""] + [f"- `{k}`" for k in doc["job_errors"]] + [""]
    L += ["## Job wall times", "", "| job | s |", "|---|---|"]
    L += [f"| {k} | {v['wall_s']:.1f} |" for k, v in doc.get("jobs", {}).items()]
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------ plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plots(doc: dict, out: Path) -> list[str]:
    made = []
    s = doc["sections"]
    for key, fn in (("accuracy", _plot_accuracy), ("recovery", _plot_recovery), ("batched", _plot_batched),
                    ("scaling", _plot_scaling)):
        sec = s.get(key)
        if not sec or "error" in sec:
            continue
        try:
            if fn(sec, out / PLOTS[key]):
                made.append(PLOTS[key])
        except Exception as e:  # noqa: BLE001 - a plot must never lose the results
            print(f"[bench] plot {key} failed: {e}")
    return made


def _save(fig, ax, path: Path, *, title: str, xlabel: str | None, ylabel: str,
          legend_size: int = 8, grid: bool = True) -> bool:
    """Label ``ax``, then write ``fig`` to ``path`` and close it."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return True


def _plot_accuracy(sec: dict, path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    any_ = False
    flat_x = max((c["iteration"] for r in sec["methods"].values() for c in r.get("curve", [])), default=1)
    styles = {"random": ":", "average": "-."}
    for name in METHODS:
        r = sec["methods"].get(name)
        if not r or not r.get("curve"):
            continue
        c = r["curve"]
        xs = [p["iteration"] for p in c]
        ys = [100 * p["acc"] for p in c]
        if len(c) == 1:
            ax.hlines(ys[0], 0, flat_x, linestyles=styles.get(name, "--"), label=name, colors=None)
        else:
            lbl = name + (" (x: meta-batches / replay cap)" if name == "oracle" else "")
            ax.plot(xs, ys, marker="o", ms=3, label=lbl)
        any_ = True
    if not any_:
        plt.close(fig)
        return False
    return _save(fig, ax, path, title="Accuracy vs iterations (meta-val, same episodes)",
                 xlabel="training iteration", ylabel="5-way 1-shot meta-val accuracy (%)", legend_size=7)


def _plot_recovery(sec: dict, path: Path) -> bool:
    c = sec.get("curves")
    if not c:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, lbl in (("five", "FIVE (meta-initialised)"), ("scratch", "scratch generator")):
        ys = c[name]
        ax.plot(range(1, len(ys) + 1), ys, label=lbl)
    ax.set_xscale("log")
    ax.axhline(sec["confidence"], color="grey", ls=":", lw=1)
    ax.axvline(sec["k"] + 1, color="grey", ls="--", lw=1, label=f"k = {sec['k']}")
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, path, title=f"Recovery on {sec['models']} held-out models (mean)",
                 xlabel="inversion step + 1 (log)", ylabel=f"teacher agreement (conf >= {sec['confidence']})")


def _plot_batched(sec: dict, path: Path) -> bool:
    rows = sec.get("rows")
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    Ts = [r["T"] for r in rows]
    xs = range(len(Ts))
    has_vmap = all("vmap_s" in r for r in rows)
    w = 0.27 if has_vmap else 0.4
    off = (-w, 0.0, w) if has_vmap else (-w / 2, w / 2)
    ax.bar([x + off[0] for x in xs], [r["sequential_s"] for r in rows], width=w, label="sequential loop")
    ax.bar([x + off[1] for x in xs], [r["batched_s"] for r in rows], width=w,
           label=f"batched ({sec.get('engine', 'vmap')})")
    if has_vmap:
        ax.bar([x + off[2] for x in xs], [r["vmap_s"] for r in rows], width=w, label="batched (vmap)")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["sequential_s"], r["batched_s"]), f"{r['speedup']:.2f}x", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(list(xs), [f"T={t}" for t in Ts])
    return _save(fig, ax, path, title=f"Batched vs sequential inversion ({sec['device']})", xlabel=None,
                 ylabel="seconds per FIVE step", grid=False)


def _plot_scaling(sec: dict, path: Path) -> bool:
    rows = sec.get("rows")
    if not rows:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.0, 3.4))
    n = [r["size"] for r in rows]
    a1.plot(n, [r["peak_rss_ingest_mb"] for r in rows], marker="o", label="ingest")
    a1.plot(n, [r["peak_rss_train_mb"] for r in rows], marker="s", label="training")
    a1.set_xscale("log")
    a1.set_xlabel("models in the zoo")
    a1.set_ylabel("peak RSS (MiB)")
    a1.set_ylim(0, max(r["peak_rss_mb"] for r in rows) * 1.25)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(n, [r["s_per_iteration"] for r in rows], marker="o")
    a2.set_xscale("log")
    a2.set_xlabel("models in the zoo")
    a2.set_ylabel("seconds / FREE iteration")
    a2.set_ylim(0, max(r["s_per_iteration"] for r in rows) * 1.25)
    a2.grid(alpha=0.3)
    fig.suptitle("Memory and speed vs zoo size")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
