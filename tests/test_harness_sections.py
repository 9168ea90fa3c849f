"""The opt-in harness sections of issue 23 at tiny size: generation cost, time to accuracy and
better at equal time (benchmarks/cost.py, time_to_accuracy.py, equal_time.py), from one run."""

from __future__ import annotations

import json

import pytest
import torch

SECTIONS = ("cost", "time_to_accuracy", "equal_time")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from benchmarks.run import run

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sections")
    small = {"clients.count": 3, "clients.epochs": 1, "evaluation.episodes": 2, "evaluation.track_episodes": 2,
             "evaluation.track_every": 0, "budget_halvings": 2, "budget_linear": 1}
    doc = run("tiny", out=out, only=list(SECTIONS), log=lambda s: None, dataset="synthetic", heldout_clients=0,
              **small, budget_s=0.3, equal_seeds=2, tta_runs=["free", "scratch-2"], tta_goals=[2.0])
    return doc, out


def test_sections_write_json_markdown_plots_and_targets(bench):
    doc, out = bench
    assert not doc["job_errors"], doc["job_errors"]
    assert set(doc["sections"]) == set(SECTIONS)
    for sec in SECTIONS:
        body = json.loads((out / f"{sec}.json").read_text())
        assert body == json.loads(json.dumps(doc["sections"][sec]))
        assert body["run"]["machine"]["cpu"] and body["run"]["preset"] == "tiny"    # a budget needs its machine
        assert "- machine: " in (out / f"{sec}.md").read_text()
    md = (out / "results.md").read_text()
    for heading in ("## Generation cost", "## Time to accuracy", "## Better at equal time"):
        assert heading in md
    assert "## Generation cost" in (out / "cost.md").read_text()
    for png in ("generation_cost.png", "time_to_accuracy.png", "equal_time.png"):
        assert png in doc["plots"] and (out / png).stat().st_size > 1000
    names = " ".join(t["target"] for t in doc["targets"])
    assert "generation cost, scratch-8 / FIVE" in names and "time to scratch-2's best" in names


def test_generation_cost_ratios_come_from_the_measured_seconds(bench):
    cost = bench[0]["sections"]["cost"]
    runs = cost["runs"]
    assert set(runs) == {"five", "scratch-2", "scratch-8"}
    assert (runs["five"]["steps"], runs["scratch-8"]["steps"]) == (2, 8)
    teachers = {n: r["last_teachers"] for n, r in runs.items()}     # the same teachers for every method
    assert len(set(map(tuple, teachers.values()))) == 1 and len(teachers["five"]) == cost["T"]
    assert len({r["images_per_teacher"] for r in runs.values()}) == 1
    for n, r in runs.items():
        assert len(r["seconds"]) == cost["iterations"] == 2
        assert r["s_per_iteration"] == pytest.approx(sum(r["seconds"]) / 2)
        assert r["ce"] > 0 and 0 <= r["confidence"] <= 1 and 0 <= r["agreement"] <= 1
        if n != "five":
            assert cost["ratios"][n] == pytest.approx(r["s_per_iteration"] / runs["five"]["s_per_iteration"])
    target = next(t for t in bench[0]["targets"] if t["target"].startswith("generation cost"))
    assert target["measured"] == cost["ratios"]["scratch-8"] and target["met"] == (target["measured"] >= 20)


def _all_runs(doc):
    tta = doc["sections"]["time_to_accuracy"]["runs"].values()
    eq = [r for m in doc["sections"]["equal_time"]["methods"].values() for r in m["runs"]]
    return list(tta) + eq


def test_budget_runs_respect_the_budget_and_choose_on_meta_val(bench):
    doc = bench[0]
    runs = _all_runs(doc)
    assert len(runs) == 2 + 8
    for r in runs:
        c = r["curve"]
        assert c[0]["train_s"] == 0 and c[0]["units"] == 0
        assert [x["train_s"] for x in c] == sorted(x["train_s"] for x in c)
        if r["method"] == "random":
            assert r["units"] == 0 and len(c) == 1
            continue
        assert r["units"] >= 1 and c[-1]["units"] == r["units"]
        assert r["train_s"] - r["last_unit_s"] < r["budget_s"] == 0.3     # every unit began within the budget
        best = max(x["acc"] for x in c)                                  # the chosen checkpoint: best meta-val,
        assert r["chosen_point"]["acc"] == best                          # the earliest of equals
        assert r["chosen"] == min(i for i, x in enumerate(c) if x["acc"] == best)
        assert "accuracies" not in r["results"]["1shot"]


def test_every_run_is_scored_on_the_same_meta_test_episodes(bench):
    doc = bench[0]
    eq = doc["sections"]["equal_time"]
    assert set(eq["episodes_sha"]) == {"1shot", "5shot"}
    for shot, shas in eq["episodes_sha"].items():
        assert len(shas) == 1
        assert {r["results"][shot]["episodes_sha"] for r in _all_runs(doc)} == set(shas)
    assert eq["seeds"] == [0, 1] and set(eq["methods"]) == {"random", "free", "scratch-2", "oracle"}
    for m in eq["methods"].values():
        assert [r["seed"] for r in m["runs"]] == [0, 1]
        assert m["mean"]["1shot"] == pytest.approx(sum(r["results"]["1shot"]["mean"] for r in m["runs"]) / 2)


def test_paired_difference_gap_share_and_sooner_ratio_follow_the_numbers(bench):
    doc = bench[0]
    eq = doc["sections"]["equal_time"]
    m = eq["methods"]
    d = eq["paired"]["1shot"]
    by_seed = [(a["results"]["1shot"]["mean"] - b["results"]["1shot"]["mean"])
               for a, b in zip(m["free"]["runs"], m["scratch-2"]["runs"])]
    assert [x["mean"] for x in d["per_seed"]] == pytest.approx(by_seed, abs=1e-9)
    assert d["mean"] == pytest.approx(sum(by_seed) / 2, abs=1e-9)
    gap = eq["gap_share"]
    assert gap["random"]["1shot"] in (0.0, None)
    span = m["oracle"]["mean"]["1shot"] - m["random"]["mean"]["1shot"]
    if span:
        assert gap["free"]["1shot"] == pytest.approx((m["free"]["mean"]["1shot"] - m["random"]["mean"]["1shot"]) / span)
    tta = doc["sections"]["time_to_accuracy"]
    (s,) = tta["sooner"]
    ref = tta["runs"]["scratch-2"]["curve"]
    assert s["accuracy"] == max(x["acc"] for x in ref)
    assert s["against_s"] == next(x["train_s"] for x in ref if x["acc"] >= s["accuracy"])
    if s["ratio"] is not None:
        assert s["ratio"] == pytest.approx(s["against_s"] / s["run_s"])
    for n, r in tta["runs"].items():
        for t, secs in tta["reach_s"][n].items():
            assert secs == next((x["train_s"] for x in r["curve"] if x["acc"] >= float(t)), None)


@pytest.mark.parametrize("setting, msg", [('tta_runs=["free", "scratch-x"]', "unknown budget run 'scratch-x'"),
                                          ('equal_pair=["free", "average"]', "equal_pair must name two"),
                                          ("tta_goals=[2]", "tta_goals needs one goal"),
                                          ('methods=["random"]', "the cost section probes")])
def test_bad_section_settings_are_refused_before_any_work(setting, msg, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--only", ",".join(SECTIONS), "--set", setting, "--out", "/nonexistent/never"])
    assert e.value.code == 2 and msg in capsys.readouterr().err
