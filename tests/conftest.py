"""Shared fixtures.

Server-side fixtures (FREE core): a small synthetic few-shot data set (tests/fake_data.py) and
tiny trained teachers, so the algorithm tests need neither the glyph cache nor minutes of CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import os

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The tests use tiny models: on a small shared CPU box, one intra-op thread is several times faster
# than oversubscribed threads, and `make test` runs one test process per core (pytest-xdist).
torch.set_num_threads(int(os.environ.get("FREE_DFML_TEST_THREADS", "1")))

from fake_data import FakeFewShotDataset  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The real-process tests (marked slow) run first: they spend most of their time waiting on
    other processes, so in `make test`'s parallel run they overlap the CPU-bound tests instead of
    forming the tail."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)      # stable: slow ones first


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s schedule (pytest-xdist, ``--dist loadgroup``): the tests of a module that has a
    module-scoped fixture (a running server, a trained zoo) go to one worker, which builds it once;
    the modules that start real servers on loopback (they import tests/loopback.py) share one worker,
    one test at a time, so that no two process trees of servers and clients compete for the CPU;
    every other test is scheduled on its own. (xdist's ``xdist_group`` marks do not reach its
    scheduler under pytest 9, whose node ids can no longer be rewritten, so the groups are made here.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False      # keep the collection order: the slow tests first

    groups = {}
    for path in Path(__file__).parent.glob("test_*.py"):
        text = path.read_text()
        if "from loopback import" in text:
            groups[path.name] = "loopback"
        elif 'scope="module"' in text:
            groups[path.name] = path.name

    class ModuleFixtureGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return groups.get(Path(nodeid.split("::", 1)[0]).name, nodeid)

    return ModuleFixtureGroups(config, log)


@pytest.fixture(scope="session")
def fake_dataset() -> FakeFewShotDataset:
    """20 meta-train, 8 meta-val, 8 meta-test classes of 30 coloured 32x32 patterns."""
    return FakeFewShotDataset(classes=(20, 8, 8), images_per_class=30)


@pytest.fixture(scope="session")
def tiny_packages(fake_dataset):
    """Five tiny Conv4 (width 8) client packages over disjoint 4-class sets, trained for a few epochs."""
    from free_dfml.client.train import TrainConfig, train_client
    pkgs = []
    for i in range(5):
        pkg, _ = train_client(fake_dataset, list(range(4 * i, 4 * i + 4)),
                              TrainConfig(epochs=4, arch_kwargs={"width": 8}, seed=i))
        pkgs.append(pkg)
    return pkgs


@pytest.fixture()
def tiny_zoo(tmp_path, tiny_packages):
    from free_dfml.server.zoo import Zoo
    zoo = Zoo(tmp_path / "zoo")
    for p in tiny_packages[:4]:
        zoo.add(p)
    return zoo
