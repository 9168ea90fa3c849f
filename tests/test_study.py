"""The one study driver (sim/study.py): clients -> zoo -> FREE -> evaluation -> artefacts, in-process
(fast, on a synthetic data set) and through Flower's simulation engine (`free-sim`, real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_data import FakeFewShotDataset

from free_dfml.common.presets import study
from free_dfml.sim.study import run_study

BIN = Path(sys.executable).parent


def test_inprocess_study_end_to_end(tmp_path):
    # a harder synthetic set than the shared fixture (more noise, larger shifts)
    ds = FakeFewShotDataset(classes=(16, 6, 8), images_per_class=24, noise=0.35, shift=3, seed=1)
    st = study("tiny", clients={"count": 4, "epochs": 3}, free={"schedule": {"iterations": 6}},
               evaluation={"episodes": 40, "track_every": 3, "track_episodes": 10})
    out = tmp_path / "run"
    doc = run_study(st, out, transport="inprocess", dataset=ds, progress=False)
    for name in ("metrics.jsonl", "results.json", "results.md", "accuracy.png", "recovered.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "clients").glob("client-*.safetensors"))) == 4
    assert json.loads((out / "results.json").read_text())["free_iterations"] == 6
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["event"] == "client" for line in lines) == 4
    assert sum(line["event"] == "submission" for line in lines) == 4
    assert sum(line["event"] == "iteration" for line in lines) == 6
    assert sum(line["event"] == "eval" for line in lines) == 6          # 3 methods x 2 shots
    assert sum("eval_1shot" in line for line in lines if line["event"] == "iteration") == 2   # tracked at 3, 6
    res = doc["results"]
    assert set(res) == {"free", "random", "average"}
    # chance is 20%: the bound fails on a broken learner (NaN, collapse, untrained head)
    assert res["free"]["1shot"]["mean"] > 0.20 + 0.10
    assert res["free"]["5shot"]["mean"] > res["free"]["1shot"]["mean"]
    assert "| free |" in (out / "results.md").read_text()
    # the state folder is a server's: the checkpoint resumes at the last iteration
    from free_dfml.server.state import StateDir
    from free_dfml.server.trainer import FreeTrainer
    assert FreeTrainer.from_state(StateDir(out / "state"), "cpu").iteration == 6


def test_study_refuses_a_dataset_object_with_the_flower_transport(tmp_path):
    ds = FakeFewShotDataset(classes=(16, 6, 8), images_per_class=8)
    with pytest.raises(ValueError, match="inprocess"):
        run_study(study("tiny"), tmp_path, transport="flower", dataset=ds, progress=False)
    with pytest.raises(ValueError, match="transport"):
        run_study(study("tiny"), tmp_path, transport="carrier-pigeon", dataset=ds, progress=False)


@pytest.mark.slow
def test_free_sim_flower_equals_inprocess(tmp_path):
    """`free-sim` on Flower's simulation engine (flwr run, no deprecated path) and the in-process driver
    give the same zoo and the same table to the last digit (same thread count), and leave no process."""
    common = ["--preset", "tiny", "--clients", "3", "--iterations", "2", "--episodes", "4", "--threads", "1"]
    t0 = time.time()
    r = subprocess.run([str(BIN / "free-sim"), "run", *common, "--out", str(tmp_path / "fl")],
                       capture_output=True, text=True, timeout=900)   # a bound on a hang, not a speed check
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DEPRECATED" not in r.stdout + r.stderr
    r2 = subprocess.run([str(BIN / "free-sim"), "run", *common, "--transport", "inprocess",
                         "--out", str(tmp_path / "ip")], capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    fl = json.loads((tmp_path / "fl" / "results.json").read_text())
    ip = json.loads((tmp_path / "ip" / "results.json").read_text())
    assert fl["mode"] == "flower-simulation" and ip["mode"] == "in-process"
    assert fl["clients"]["accepted"] == 3 and fl["zoo_size"] == 3 and fl["free_iterations"] == 2
    assert sorted(p.name for p in (tmp_path / "fl" / "state" / "zoo").rglob("*.safetensors")) == \
        sorted(p.name for p in (tmp_path / "ip" / "state" / "zoo").rglob("*.safetensors"))
    strip = lambda res: {m: {s: {k: v for k, v in r.items() if k != "eval_s"} for s, r in d.items()}  # noqa: E731
                         for m, d in res.items()}
    assert strip(fl["results"]) == strip(ip["results"])
    for name in ("metrics.jsonl", "results.md", "accuracy.png", "recovered.png"):
        assert (tmp_path / "fl" / name).is_file(), name
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "fl")], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
    print(f"free-sim flower + inprocess: {time.time() - t0:.1f} s")
