"""Simulate a FREE federation in one process with Flower's simulation engine (Ray).

    python examples/simulate.py                       # 4 clients, quick preset, runs/sim-example
    python examples/simulate.py --clients 8 --arch mix --preset demo

The same ServerApp / ClientApp as a deployment: each virtual client trains a classifier on its own
classes and publishes only weights + metadata; the server builds the zoo, trains FREE, and the
meta-learner is compared with a random initialisation and the zoo average on meta-test tasks.
Equivalent to ``free-sim run``; this shows the Python API (:func:`free_dfml.server.sim_cli.run_sim`).
"""

from __future__ import annotations

import argparse
import json

from free_dfml.server.sim_cli import SimConfig, run_sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--dataset", default="glyphs")
    ap.add_argument("--classes-per-client", type=int, default=5)
    ap.add_argument("--arch", default="conv4", help="conv4 | resnet10 | resnet18 | mix")
    ap.add_argument("--preset", default="quick", choices=sorted(SimConfig.PRESETS))
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--dp-epsilon", type=float, default=None)
    ap.add_argument("--out", default="runs/sim-example")
    a = ap.parse_args()
    cfg = SimConfig.preset_config(a.preset, clients=a.clients, dataset=a.dataset,
                                  classes_per_client=a.classes_per_client, arch=a.arch, iterations=a.iterations,
                                  eval_episodes=a.episodes, dp_epsilon=a.dp_epsilon, out=a.out)
    doc = run_sim(cfg)
    print(json.dumps({m: {s: round(100 * r["mean"], 2) for s, r in res.items()} for m, res in doc["results"].items()}))
    print(f"artefacts in {a.out}: results.md, results.json, metrics.jsonl, accuracy.png, recovered.png")


if __name__ == "__main__":
    main()
