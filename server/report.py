"""Reporting shared by the in-process job and ``free-sim``: scoring every method on the same
episodes, the results table (terminal and Markdown), the accuracy plot and the recovered-image grid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from free_dfml.common.datasets import SplitData
from free_dfml.common.evaluation import evaluate


def evaluate_methods(learners: dict[str, nn.Module], test: SplitData, *, way: int, shots: tuple[int, ...],
                     episodes: int, steps: int, lr: float, seed: int, device: torch.device | str,
                     progress: bool = True, log: Callable[[dict], None] | None = None,
                     with_episodes: bool = False) -> dict[str, dict]:
    """Score each learner on the same ``episodes`` episodes (same seed) for every shot count.

    Returns ``{method: {"<shot>shot": EvalResult.to_dict() + eval_s}}`` (``with_episodes``: with the
    per-episode accuracies, for paired differences); ``log`` gets one record each.
    """
    results: dict[str, dict] = {}
    for name, learner in learners.items():
        learner = learner.to(device)
        results[name] = {}
        for shot in shots:
            t0 = time.perf_counter()
            r = evaluate(learner, test, way=way, shot=shot, episodes=episodes, steps=steps, lr=lr,
                         seed=seed, device=device, progress=f"{name} {shot}-shot" if progress else False)
            dt = time.perf_counter() - t0
            results[name][f"{shot}shot"] = {**r.to_dict(with_episodes), "eval_s": round(dt, 2)}
            if log is not None:
                log({"event": "eval", "method": name, **r.to_dict(), "eval_s": dt})
    return results


def free_above_random(results: dict[str, dict]) -> dict[str, bool] | None:
    """Per shot: does FREE's 95% interval lie wholly above random's?"""
    if "free" not in results or "random" not in results:
        return None
    f, r = results["free"], results["random"]
    return {s: f[s]["mean"] - f[s]["ci95"] > r[s]["mean"] + r[s]["ci95"] for s in f if s in r}


def console():
    from rich.console import Console
    return Console()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_accuracy_plot(history: list[dict], path: Path) -> bool:
    pts = [(h["iteration"], h["eval_1shot"], h.get("eval_1shot_ci95", 0.0))
           for h in history if "eval_1shot" in h]
    if not pts:
        return False
    plt = _pyplot()
    it, acc, ci = zip(*pts)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(it, [100 * a for a in acc], yerr=[100 * c for c in ci], marker="o", capsize=3)
    ax.set_xlabel("FREE iteration")
    ax.set_ylabel("5-way 1-shot accuracy (%), meta-val")
    ax.set_title("FREE: meta-val accuracy over training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save_recovered_grid(trainer, ids: list[str], path: Path, per_class: int = 4,
               max_models: int = 10) -> bool:
    plt = _pyplot()
    from torchvision.utils import make_grid
    rows, width = [], 0
    for mid in ids[:max_models]:
        x = trainer.recovered_images(mid, per_class=per_class)
        if len(x):
            rows.append(x)
            width = max(width, len(x))
    if not rows:
        return False
    padded = [torch.cat([r, torch.ones(width - len(r), *r.shape[1:])]) if len(r) < width else r
              for r in rows]
    grid = make_grid(torch.cat(padded), nrow=width, padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(min(20, width * 0.5 + 1), len(rows) * 0.55 + 0.8))
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"Recovered images: one row per client model ({per_class} per class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _rows(doc: dict) -> list[list[str]]:
    """One row per method; with ``doc["paired"]`` ({method: {shot key: {mean, ci95}}}, FREE minus
    that method on the same episodes) a paired-difference column per shot."""
    rows = []
    paired = doc.get("paired")
    for name, res in doc["results"].items():
        row = [name]
        for key in sorted(res):
            r = res[key]
            row.append(f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}")
        if paired is not None:
            for key in sorted(res):
                d = paired.get(name, {}).get(key)
                row.append(f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}" if d else "")
        row.append(f"{sum(r['eval_s'] for r in res.values()):.1f}")
        rows.append(row)
    return rows


def _headers(doc: dict) -> list[str]:
    first = next(iter(doc["results"].values()))
    way = doc.get("way", 5)
    h = ["method"] + [f"{way}-way {k.replace('shot', '-shot')} (%)" for k in sorted(first)]
    if doc.get("paired") is not None:
        h += [f"free − method, {k.replace('shot', '-shot')} (paired, pp)" for k in sorted(first)]
    return h + ["eval s"]


def markdown(doc: dict, title: str = "FREE demo results") -> str:
    h = _headers(doc)
    learner = doc["config"]["free_config"]["learner"]
    lines = [f"# {title}", "",
             f"Meta-test split, {doc['config']['eval_episodes']} episodes, 15 queries a class, "
             f"{learner['adapt_steps']} adaptation steps, inner lr {learner['inner_lr']} for every method; "
             "95% intervals.", "",
             "| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(doc)]
    t = doc["times_s"]
    lines += ["", f"Wall time: {t['total']:.0f} s (data {t['data']:.0f} s, clients {t['clients']:.0f} s, "
              f"FREE {t['free']:.0f} s for {doc['free_iterations']} iterations, evaluation {t['eval']:.0f} s) "
              f"on {doc['device']} with {doc['torch_threads']} torch threads; process CPU time "
              f"{t['cpu']:.0f} s.", ""]
    return "\n".join(lines)


def print_table(console, doc: dict, title: str = "FREE vs baselines (meta-test, 95% intervals)") -> None:
    from rich.table import Table
    table = Table(title=title)
    for h in _headers(doc):
        table.add_column(h)
    for r in _rows(doc):
        table.add_row(*r)
    console.print(table)
    if "times_s" not in doc:
        return
    t = doc["times_s"]
    console.print(f"wall {t['total']:.0f} s (clients {t['clients']:.0f} s, FREE {t['free']:.0f} s, "
                  f"evaluation {t['eval']:.0f} s; process CPU {t['cpu']:.0f} s)")
