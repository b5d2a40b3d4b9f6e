import numpy as np
import pytest
import torch

from apparate.zoo import conditions
from apparate.zoo.cifar10 import CLASSES, VEHICLE_MAP


def test_resnet20_is_accurate_on_jpeg_test_images(r20):
    s = r20.stream("test", n=300)
    assert s.inputs.shape == (300, 32, 32, 3) and s.inputs.dtype == np.uint8
    with torch.no_grad():
        pred = r20.model(r20.encode([it.input for it in s])).argmax(-1).numpy()
    assert (pred == s.labels).mean() > 0.72  # about 81% on the JPEG test set


def test_test_stream_order_is_fixed(r20):
    a, b = r20.stream("test", n=50), r20.stream("test", n=50)
    assert np.array_equal(a.inputs, b.inputs)
    assert len(set(a.labels[:20].tolist())) > 3  # not grouped by class


def test_vehicle_map():
    assert [CLASSES[i] for i, v in enumerate(VEHICLE_MAP) if v] == ["airplane", "automobile", "ship", "truck"]


def test_camera_day_drifts_deterministically(r20):
    a = r20.stream("camera-day", seed=3, n=400)
    b = r20.stream("camera-day", seed=3, n=400)
    c = r20.stream("camera-day", seed=4, n=400)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.inputs, c.inputs)
    phase = a.meta["phase"]
    assert len(a) == 400 and np.all(np.diff(phase) >= 0) and len(np.unique(phase)) == len(a.meta["phases"])
    night = a.inputs[phase == 0].mean()
    midday = a.inputs[phase == a.meta["phases"].index("midday")].mean()
    assert night < midday  # conditions really change
    # The class mix changes too: the rush hour is mostly cars and trucks.
    rush = a.labels[phase == a.meta["phases"].index("morning rush")]
    fog = a.labels[phase == a.meta["phases"].index("afternoon fog")]
    veh = np.array(VEHICLE_MAP)
    assert veh[rush].mean() > veh[fog].mean()


def test_conditions_are_valid_and_deterministic():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for st in ({"brightness": -0.3}, {"contrast": 0.5}, {"blur": 1.5}, {"noise": 0.1}, {"fog": 0.5}):
        out1 = conditions.apply(img, st, torch.Generator().manual_seed(1))
        out2 = conditions.apply(img, st, torch.Generator().manual_seed(1))
        assert out1.dtype == torch.uint8 and out1.shape == img.shape
        assert torch.equal(out1, out2) and not torch.equal(out1, img)
    assert conditions.blur(img.float(), 2.0).std() < img.float().std()
    with pytest.raises(ValueError, match="unknown image conditions"):
        conditions.apply(img, {"rain": 1.0}, torch.Generator())


def test_unknown_workload_and_stream(r20, data_dir):
    from apparate.zoo.workloads import get_workload

    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("cifar10-resnet99", data_dir)
    with pytest.raises(ValueError, match="no stream 'nope'"):
        r20.stream("nope")


def test_weights_are_checked(tmp_path, data_dir):
    from apparate.zoo.cifar_resnet import load_cifar_resnet

    (tmp_path / "cifar10-resnet").mkdir()
    (tmp_path / "cifar10-resnet" / "resnet20-00000000.th").write_bytes(b"junk")
    with pytest.raises(ValueError, match="corrupt"):
        load_cifar_resnet(tmp_path, 20)
    with pytest.raises(FileNotFoundError):
        load_cifar_resnet(tmp_path, 32)
