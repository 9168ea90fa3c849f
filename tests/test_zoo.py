"""The zoo: content addressing, duplicates, crash reconciliation, bounded teacher cache."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from free_dfml.common.package import PackageError
from free_dfml.server.zoo import Zoo


def test_content_addressed_and_round_trip(tmp_path, tiny_packages):
    zoo = Zoo(tmp_path)
    pkg = tiny_packages[0]
    mid, new = zoo.add(pkg)
    assert new and mid == pkg.model_id and len(mid) == 64
    assert (tmp_path / "models" / f"{mid}.safetensors").is_file()
    assert mid in zoo and len(zoo) == 1 and zoo.ids() == [mid]
    assert zoo.meta(mid).num_classes == pkg.meta.num_classes
    back = zoo.package(mid)
    assert back.model_id == mid
    assert all(torch.equal(back.state[k], pkg.state[k]) for k in pkg.state)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(zoo.teacher(mid)(x), pkg.build()(x))


def test_duplicate_stored_once_even_concurrently(tmp_path, tiny_packages):
    zoo = Zoo(tmp_path)
    pkg = tiny_packages[1]
    out: list[tuple[str, bool]] = []
    threads = [threading.Thread(target=lambda: out.append(zoo.add(pkg))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(new for _, new in out) == 1
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 1
    assert len((tmp_path / "index.jsonl").read_text().splitlines()) == 1
    assert zoo.add(pkg) == (pkg.model_id, False)
    assert len(Zoo(tmp_path)) == 1


def test_arrival_order_and_reconcile_after_missing_index_line(tmp_path, tiny_packages):
    zoo = Zoo(tmp_path)
    ids = [zoo.add(p)[0] for p in tiny_packages[:3]]
    assert zoo.ids() == ids
    # a SIGKILL after the file write but before the index append: drop the last line, tear another
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    (tmp_path / "index.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    # and a leftover temp file of an interrupted write
    (tmp_path / "models" / ".x.safetensors.123.tmp").write_bytes(b"partial")
    reopened = Zoo(tmp_path)
    assert reopened.ids()[0] == ids[0] and sorted(reopened.ids()) == sorted(ids)
    assert not list((tmp_path / "models").glob(".*.tmp"))
    entries = [json.loads(l) for l in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in entries) == sorted(ids)          # index repaired on disk
    # an index line whose file vanished is dropped
    (tmp_path / "models" / f"{ids[0]}.safetensors").unlink()
    assert ids[0] not in Zoo(tmp_path).ids()


def test_teacher_cache_is_bounded_lru(tmp_path, tiny_packages):
    zoo = Zoo(tmp_path, cache_size=2)
    ids = [zoo.add(p)[0] for p in tiny_packages[:4]]
    a = zoo.teacher(ids[0])
    assert zoo.teacher(ids[0]) is a                 # hit: the same built module
    for m in ids[1:]:
        zoo.teacher(m)
        assert zoo.cached() <= 2
    assert zoo.cached() == 2
    assert zoo.teacher(ids[0]) is not a             # evicted, rebuilt
    t = zoo.teacher(ids[1])
    assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_corrupt_stored_file_is_rejected(tmp_path, tiny_packages):
    zoo = Zoo(tmp_path)
    mid, _ = zoo.add(tiny_packages[0])
    path = tmp_path / "models" / f"{mid}.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"                # a NaN in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError):
        Zoo(tmp_path).package(mid)
