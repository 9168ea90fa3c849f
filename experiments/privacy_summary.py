"""The Markdown table of docs/privacy.md from the audit reports that experiments/privacy_table.sh writes.

    python -m experiments.privacy_summary runs/privacy [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"nodp": "no DP, Adam lr 0.003", "nodp-lr01": "no DP, Adam lr 0.01 (as free-sim's demo)", "nodp-crop": "no DP, `--augment crop`",
          "dp8-plain": "DP, plain recipe (no prior, every layer)", "dp8": "DP recipe", "dp4": "DP recipe",
          "dp1": "DP recipe"}
ORDER = ["nodp", "nodp-lr01", "nodp-crop", "dp8-plain", "dp8", "dp4", "dp1"]


def share(inv: dict, attack: str, space: str) -> str:
    s = inv[attack]["spaces"][space]
    return f"{s['train_share']:.2f} ({s['p_value']:.2g})"


def rows(root: Path) -> list[str]:
    out = ["| client | run | epsilon | train acc | held-out acc | membership AUC loss / conf | TPR at 1% FPR (loss) "
           "| NN training share FIVE pixel / random (p) | scratch pixel / random (p) |",
           "|---|---|---|---|---|---|---|---|---|"]
    reports = sorted(root.glob("audit-c*-*/report.json"))
    by = {}
    for r in reports:
        client, _, run = r.parent.name[len("audit-c"):].partition("-")
        by[(int(client), run)] = json.loads(r.read_text())
    for (client, run) in sorted(by, key=lambda k: (k[0], ORDER.index(k[1]) if k[1] in ORDER else 99)):
        d = by[(client, run)]
        m, inv = d["membership"], d["inversion"]
        eps = f"{d['dp_epsilon']:.2f}" if d.get("dp_epsilon") is not None else "-"
        out.append(f"| {client} | {LABELS.get(run, run)} | {eps} | {m['train_accuracy']:.2f} | "
                   f"{m['holdout_accuracy']:.2f} | {m['loss']['auc']:.2f} / {m['confidence']['auc']:.2f} | "
                   f"{m['loss']['tpr_at_1pct_fpr']:.2f} | {share(inv, 'five', 'pixel')} / {share(inv, 'five', 'random')} | "
                   f"{share(inv, 'scratch', 'pixel')} / {share(inv, 'scratch', 'random')} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    text = "\n".join(rows(a.root)) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
