"""Simulate a FREE federation on one machine with Flower's simulation engine: the Python API.

    python examples/simulate.py                                   # the tiny study, 4 clients
    python examples/simulate.py --preset demo --clients 8 --arch mix

The same ServerApp / ClientApp as a deployment run under ``flwr run`` on a local simulation
federation: each virtual client trains a classifier on its own classes and publishes only weights
+ metadata; the server builds the zoo, trains FREE, and the meta-learner is compared with a random
initialisation and the zoo average on meta-test tasks. Equivalent to ``free-sim run``; this shows
:func:`free_dfml.common.presets.study` and :func:`free_dfml.sim.study.run_study`.
"""

from __future__ import annotations

import argparse
import json

from free_dfml.common.presets import NAMES, study
from free_dfml.sim.study import run_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=NAMES)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--arch", default=None, help="conv4 | resnet10 | resnet18 | mix")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--transport", default="flower", choices=("flower", "inprocess"))
    ap.add_argument("--out", default="runs/sim-example")
    a = ap.parse_args()
    clients = {k: v for k, v in (("count", a.clients), ("arch", a.arch)) if v is not None}
    free = {"schedule": {"iterations": a.iterations}} if a.iterations else {}
    doc = run_study(study(a.preset, clients=clients, free=free), a.out, transport=a.transport)
    print(json.dumps({m: {s: round(100 * r["mean"], 2) for s, r in res.items()} for m, res in doc["results"].items()}))
    print(f"artefacts in {a.out}: results.md, results.json, metrics.jsonl, accuracy.png, recovered.png")


if __name__ == "__main__":
    main()
