"""Every architecture at 32 and 84 px, and one test per model-package rejection reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from free_dfml.common.models import ARCHITECTURES, Normalized, build_model
from free_dfml.common.package import (META_KEY, PackageError, load_package, make_package,
                                      package_from_bytes)


def _package(arch="conv4", size=32, num_classes=5, norm="bn", width=8):
    torch.manual_seed(0)
    net = build_model(arch, num_classes=num_classes, image_size=size, width=width, norm=norm)
    return make_package(Normalized(net, (0.5,) * 3, (0.25,) * 3), arch=arch,
                        arch_kwargs={"width": width, "norm": norm}, num_classes=num_classes,
                        input_shape=(3, size, size), mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("size", [32, 84])
def test_architecture_forward_and_package_round_trip(arch, size):
    pkg = _package(arch, size)
    x = torch.rand(2, 3, size, size)
    model = pkg.build()
    out = model(x)
    assert out.shape == (2, 5)
    back = package_from_bytes(pkg.to_bytes())
    assert back.meta == pkg.meta and back.model_id == pkg.model_id
    assert torch.equal(back.build()(x), out)
    # the whole feature path + head is there
    assert set(back.state) == set(pkg.state)


# ----------------------------------------------------------------------------------- rejections

def _parts(pkg=None):
    pkg = pkg or _package()
    doc = json.loads(pkg.meta.to_json())
    return dict(pkg.state), doc


def _bytes(state, doc) -> bytes:
    meta = {META_KEY: json.dumps(doc)} if doc is not None else None
    return st_save(state, metadata=meta)


def _reject(state, doc, match):
    with pytest.raises(PackageError, match=match):
        package_from_bytes(_bytes(state, doc))


def test_reject_truncated_file(tmp_path):
    data = _package().to_bytes()
    p = tmp_path / "m.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="truncated or corrupt|corrupt safetensors data"):
        load_package(p)
    p.write_bytes(data[:20])                        # cut inside the header
    with pytest.raises(PackageError, match="truncated or corrupt"):
        load_package(p)


def test_reject_not_safetensors(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(PackageError, match="not a safetensors file"):
        load_package(p)


def test_reject_missing_metadata():
    state, _ = _parts()
    _reject(state, None, "no free-dfml metadata")


def test_reject_unknown_arch():
    state, doc = _parts()
    doc["arch"] = "vgg11"
    _reject(state, doc, "unknown architecture 'vgg11'")


def test_reject_bad_arch_kwargs():
    state, doc = _parts()
    doc["arch_kwargs"] = {"width": 8, "depth": 3}
    _reject(state, doc, "takes no argument.*depth")


def test_reject_missing_tensor():
    state, doc = _parts()
    state.pop("head.bias")
    _reject(state, doc, "missing tensor 'head.bias'")


def test_reject_extra_tensor():
    state, doc = _parts()
    state["evil.payload"] = torch.zeros(3)
    _reject(state, doc, "unexpected tensor 'evil.payload'")


def test_reject_wrong_shape():
    state, doc = _parts()
    state["head.weight"] = torch.zeros(5, 7)
    _reject(state, doc, r"tensor 'head.weight' has shape \[5, 7\], expected")


def test_reject_wrong_dtype():
    state, doc = _parts()
    state["head.bias"] = state["head.bias"].double()
    _reject(state, doc, "head.bias' has dtype float64, expected float32")


def test_reject_nan():
    state, doc = _parts()
    state["head.bias"] = state["head.bias"].clone()
    state["head.bias"][0] = float("nan")
    _reject(state, doc, "head.bias' holds non-finite values")


def test_reject_inf():
    state, doc = _parts()
    state["head.weight"] = state["head.weight"].clone()
    state["head.weight"][0, 0] = float("inf")
    _reject(state, doc, "head.weight' holds non-finite values")


@pytest.mark.parametrize("n", [1, 1001])
def test_reject_num_classes_out_of_range(n):
    state, doc = _parts()
    doc["num_classes"] = n
    _reject(state, doc, r"num_classes must be an integer in 2\.\.1000")


@pytest.mark.parametrize("side", [4, 600, 512])
def test_reject_image_side_out_of_range(side):
    state, doc = _parts()
    doc["input_shape"] = [3, side, side]
    _reject(state, doc, r"input_shape H must be an integer in 8\.\.128")


def test_reject_nonpositive_std():
    state, doc = _parts()
    doc["std"] = [0.25, 0.0, 0.25]
    _reject(state, doc, "std must be positive")


def test_reject_oversized_payload(tmp_path):
    data = _package().to_bytes()
    with pytest.raises(PackageError, match=f"{len(data)} bytes, over the 1000-byte limit"):
        package_from_bytes(data, max_bytes=1000)
    p = tmp_path / "m.safetensors"
    p.write_bytes(data)
    with pytest.raises(PackageError, match="over the 1000-byte limit"):
        load_package(p, max_bytes=1000)


def test_reject_dp_with_batchnorm():
    state, doc = _parts()
    doc["dp"] = {"epsilon": 8.0, "delta": 1e-5}
    _reject(state, doc, "DP-trained model must use norm 'gn'")
    gn_state, gn_doc = _parts(_package(norm="gn"))
    gn_doc["dp"] = {"epsilon": 8.0, "delta": 1e-5}
    assert package_from_bytes(_bytes(gn_state, gn_doc)).meta.is_dp
