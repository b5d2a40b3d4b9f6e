"""The Python API: prepare a real (small) model, compare policies on it, from the package top."""

import numpy as np
import pytest

import apparate


def test_prepare_a_zoo_workload_and_replay_it(data_dir, tmp_path):
    bundle = apparate.prepare("cifar10-resnet20", tmp_path / "b", data_dir=data_dir, bootstrap=300, max_batch=2,
                              warmup=0, repeats=1, holdout=0.25, progress=False)
    assert bundle.num_sites == 9 and (tmp_path / "b" / "manifest.json").exists()
    result = apparate.compare(bundle, "test", policies=["vanilla", "apparate", "optimal"], n=200, rate=50.0,
                             data_dir=data_dir)
    assert list(result.metrics) == ["vanilla", "apparate", "optimal"]
    assert all(m.requests == 200 for m in result.metrics.values())
    assert result.metrics["vanilla"].accuracy == 1.0
    assert result.metrics["optimal"].p50_ms <= result.metrics["vanilla"].p50_ms
    assert "apparate" in result.table() and "p50 vs vanilla" in result.table()


def test_prepare_your_own_model(r20, tmp_path):
    stream = r20.stream("test", n=60)
    bundle = apparate.prepare(r20.model, tmp_path / "own", encode=r20.encode, bootstrap=stream, num_classes=10,
                              max_batch=2, warmup=0, repeats=1, holdout=0.25, epochs=2, progress=False)
    assert bundle.num_sites == 9 and np.all(bundle.profile.ramp_ms > 0)
    with pytest.raises(ValueError, match="encode"):
        apparate.prepare(r20.model, tmp_path / "x")
