import json
import shutil

import numpy as np
import pytest
import torch

from apparate.model.bundle import BundleError, load_bundle


def test_round_trip(r20_bundle, r20, test_images):
    b = load_bundle(r20_bundle.path, model=r20.model)
    assert [s.to_dict() for s in b.sites] == [s.to_dict() for s in r20_bundle.sites]
    assert b.specs == r20_bundle.specs
    for p, q in zip(b.ramps.parameters(), r20_bundle.ramps.parameters()):
        assert torch.equal(p, q)
    assert np.array_equal(b.recording.conf, r20_bundle.recording.conf)
    assert np.array_equal(b.profile.site_ms, r20_bundle.profile.site_ms)
    m = b.manifest
    assert m["format"] == "apparate.bundle/1" and m["versions"]["torch"] == torch.__version__
    assert m["model"]["workload"] == "cifar10-resnet20" and len(m["model"]["fingerprint"]) == 64
    assert len(m["training"]["sites"]) == 9
    x = r20.encode([test_images.item(i).input for i in range(8)])
    e1, e2 = b.early_exit_model(active=[2, 5]), r20_bundle.early_exit_model(active=[2, 5])
    try:
        o1, o2 = e1(x), e2(x)
        assert np.array_equal(o1.ramps[5].conf, o2.ramps[5].conf)
    finally:
        e1.remove_hooks()
        e2.remove_hooks()


def test_zoo_bundle_rebuilds_its_model(r20_bundle, data_dir):
    from apparate.zoo import load_bundle as load_zoo_bundle

    b = load_zoo_bundle(r20_bundle.path, data_dir=data_dir)
    assert b.workload is not None and b.workload.name == "cifar10-resnet20"
    with pytest.raises(BundleError, match="apparate.zoo.load_bundle"):  # the model layer knows no zoo
        load_bundle(r20_bundle.path)


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst)
    return dst


def test_missing_files_are_named(r20_bundle, r20, tmp_path):
    dst = _copy(r20_bundle, tmp_path)
    (dst / "ramps.safetensors").unlink()
    with pytest.raises(BundleError, match="missing ramps.safetensors"):
        load_bundle(dst, model=r20.model)
    with pytest.raises(BundleError, match="no bundle directory"):
        load_bundle(tmp_path / "nowhere")
    (dst / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(dst, model=r20.model)


def test_other_format_version_is_refused(r20_bundle, r20, tmp_path):
    dst = _copy(r20_bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["format"] = "apparate.bundle/99"
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 'apparate.bundle/99'.*prepare it again"):
        load_bundle(dst, model=r20.model)


def test_damaged_files_and_other_models_are_refused(r20_bundle, r20, tmp_path):
    from apparate.zoo.cifar_resnet import CifarResNet

    dst = _copy(r20_bundle, tmp_path)
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(dst, model=CifarResNet(20).eval())
    (dst / "ramps.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="damaged"):
        load_bundle(dst, model=r20.model)
    (dst / "manifest.json").write_text("{ nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(dst, model=r20.model)
