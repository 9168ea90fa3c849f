"""Better at equal time (``--only equal_time``): every method of ``equal_methods`` trained within
the same wall-clock budget (``budget_s``) at ``equal_seeds`` training seeds, scored on meta-test.

Each run is :func:`benchmarks.time_to_accuracy.run_budget` (the checkpoint chosen on meta-val,
never on meta-test; the same meta-test episodes for every method and seed; a run of the time to
accuracy section with the same name and seed is the same job). Reported per method and shot: the
mean over seeds of the meta-test accuracy, the iterations each run reached; the paired difference
``equal_pair[0] - equal_pair[1]`` (per seed episode by episode, then over the seeds: its mean and
the 95% t-interval of the per-seed differences, with the episode-paired interval of all seeds'
episodes pooled beside it); the share of the random-to-oracle gap each method closes.
"""

from __future__ import annotations

import math

from benchmarks.jobs import Job
from benchmarks.report import _plt, _save, run_lines
from benchmarks.time_to_accuracy import budget_job, outcome_rows, run_row, run_spec
from benchmarks.zoos import main_zoo_jobs
from free_dfml.common.evaluation import paired

PLOT = "equal_time.png"
# two-sided 95% quantiles of Student's t, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seeds(p) -> list[int]:
    return [p.study.seed + i for i in range(p.equal_seeds)]


def check(p) -> None:
    """A ValueError for settings this section cannot run with (before any work starts)."""
    for n in p.equal_methods:
        run_spec(n)
    if len(p.equal_pair) != 2 or not set(p.equal_pair) <= set(p.equal_methods) or p.equal_seeds < 1:
        raise ValueError(f"equal_pair must name two of equal_methods ({list(p.equal_methods)}), "
                         "and equal_seeds must be >= 1")


def jobs(p) -> list[Job]:
    check(p)
    return main_zoo_jobs(p) + [budget_job(p, n, s) for s in seeds(p) for n in p.equal_methods]


def t_interval(xs: list[float]) -> float | None:
    """Half-width of the 95% t-interval of the mean of ``xs`` (None for fewer than two)."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def summarize(outcomes: dict, p) -> dict:
    sec: dict = {"budget_s": p.budget_s, "seeds": seeds(p), "methods": {}, "errors": {},
                 "pair": list(p.equal_pair), "paired": {}, "gap_share": {}}
    by_seed = {s: outcome_rows(outcomes, p.equal_methods, s, sec["errors"]) for s in seeds(p)}
    shots = [f"{k}shot" for k in p.study.evaluation.shots]
    for n in p.equal_methods:
        runs = [by_seed[s][n] for s in seeds(p) if n in by_seed[s]]
        if not runs:
            continue
        sec["methods"][n] = {
            "runs": [run_row(r) for r in runs],
            "mean": {k: sum(r["results"][k]["mean"] for r in runs) / len(runs) for k in shots},
            "seed_ci95": {k: t_interval([r["results"][k]["mean"] for r in runs]) for k in shots},
            "units": [r["units"] for r in runs]}
    sec["episodes_sha"] = {k: sorted({r["results"][k]["episodes_sha"] for rows in by_seed.values()
                                      for r in rows.values()}) for k in shots}
    a, b = p.equal_pair
    both = [s for s in seeds(p) if a in by_seed[s] and b in by_seed[s]]
    for k in shots:
        if not both:
            break
        per_seed = [paired(by_seed[s][a]["results"][k]["accuracies"], by_seed[s][b]["results"][k]["accuracies"])
                    for s in both]
        pooled = paired([x for s in both for x in by_seed[s][a]["results"][k]["accuracies"]],
                        [x for s in both for x in by_seed[s][b]["results"][k]["accuracies"]])
        diffs = [d["mean"] for d in per_seed]
        half = t_interval(diffs)
        mean = sum(diffs) / len(diffs)
        sec["paired"][k] = {"per_seed": per_seed, "mean": mean, "seed_ci95": half, "pooled_episodes": pooled,
                            "above_zero": None if half is None else mean - half > 0}
    m = sec["methods"]
    if "random" in m and "oracle" in m:
        for n, r in m.items():
            sec["gap_share"][n] = {k: (r["mean"][k] - m["random"]["mean"][k])
                                   / (m["oracle"]["mean"][k] - m["random"]["mean"][k])
                                   if m["oracle"]["mean"][k] != m["random"]["mean"][k] else None for k in shots}
    return sec


def targets(sec: dict) -> list[dict]:
    d = sec.get("paired", {}).get("1shot")
    if not d:
        return []
    a, b = sec["pair"]
    met = d["mean"] >= 0.01 and bool(d["above_zero"])
    return [{"target": f"equal time ({sec['budget_s']:g} s): {a} - {b}, 1-shot meta-test, "
                       f"{len(d['per_seed'])} seeds (points)", "goal": ">= +1, paired interval above 0",
             "measured": 100 * d["mean"], "met": met}]


def _pm(x: float, ci: float | None) -> str:
    return f"{100 * x:.2f}" + ("" if ci is None else f" ± {100 * ci:.2f}")


def markdown(sec: dict) -> str:
    shots = sorted({k for r in sec["methods"].values() for k in r["mean"]})
    L = ["## Better at equal time", "", *run_lines(sec),
         f"Every method trained for {sec['budget_s']:g} s of training wall-clock at seeds "
         f"{', '.join(map(str, sec['seeds']))}; the checkpoint chosen on meta-val; meta-test 5-way, the same "
         "episodes for every run; mean over seeds ± 95% t-interval of the seeds.", "",
         "| method | " + " | ".join(f"{k.replace('shot', '-shot')} (%)" for k in shots)
         + " | " + " | ".join(f"gap closed {k.replace('shot', '-shot')}" for k in shots) + " | iterations |",
         "|---|" + "---|" * (2 * len(shots) + 1)]
    for n, r in sec["methods"].items():
        gap = sec["gap_share"].get(n, {})
        L.append(f"| {n} | " + " | ".join(_pm(r["mean"][k], r["seed_ci95"][k]) for k in shots) + " | "
                 + " | ".join("-" if gap.get(k) is None else f"{100 * gap[k]:.0f}%" for k in shots)
                 + f" | {', '.join(map(str, r['units']))} |")
    a, b = sec["pair"]
    L += ["", f"Paired difference {a} - {b} (points):", "",
          "| shot | per seed | mean ± t-interval of seeds | episodes pooled | interval above 0 |", "|---|---|---|---|---|"]
    for k, d in sec["paired"].items():
        per_seed = ", ".join(f"{100 * x['mean']:+.2f}" for x in d["per_seed"])
        L.append(f"| {k} | {per_seed} | "
                 f"{_pm(d['mean'], d['seed_ci95'])} | {_pm(d['pooled_episodes']['mean'], d['pooled_episodes']['ci95'])} "
                 f"| {d['above_zero']} |")
    for k, e in sec["errors"].items():
        L.append(f"\n{k} failed: `{e.strip().splitlines()[-1] if e else '?'}`")
    return "\n".join(L) + "\n"


def plots(sec: dict, out) -> list[str]:
    """Meta-test accuracy per method and shot at the budget: the seeds' mean, their t-interval, each seed."""
    methods = sec.get("methods") or {}
    shots = sorted({k for r in methods.values() for k in r["mean"]})
    if not methods:
        return []
    fig, ax = _plt().subplots(figsize=(6.4, 3.8))
    width = 0.8 / max(1, len(shots))
    for j, k in enumerate(shots):
        xs = [i + (j - (len(shots) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, [100 * r["mean"][k] for r in methods.values()], width=width,
               yerr=[100 * (r["seed_ci95"][k] or 0.0) for r in methods.values()], capsize=3,
               label=k.replace("shot", "-shot"))
        for x, r in zip(xs, methods.values()):
            ax.plot([x] * len(r["runs"]), [100 * run["results"][k]["mean"] for run in r["runs"]], "k.", ms=3)
    ax.set_xticks(range(len(methods)), list(methods))
    _save(fig, ax, out / PLOT, title=f"Meta-test accuracy at {sec['budget_s']:g} s of training (seeds: dots)",
          xlabel=None, ylabel="5-way accuracy (%)", grid=False)
    return [PLOT]
