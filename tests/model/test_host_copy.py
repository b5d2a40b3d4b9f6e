"""The GPU path's pieces, run on the CPU: device names, the event-based release path driven by
stand-in events, models moved between devices (dtypes here), profiles that name their device.
The checks that need CUDA itself are at the end, skipped without a CUDA device."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from apparate.core.profile import LatencyProfile
from apparate.devices import resolve_device, to_device
from apparate.model.host_copy import HostRelease, host_release_for

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class GateEvent:
    """Stands in for a CUDA event: `synchronize()` blocks until the test opens the gate, as a
    real one blocks until the device has passed it."""

    def __init__(self, opened: bool = False) -> None:
        self.opened = threading.Event()
        if opened:
            self.opened.set()
        self.recorded = False

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.opened.wait(60), "a stand-in event was never opened"

    def query(self) -> bool:
        return self.opened.is_set()


class Gates:
    """The event factory: every event it made, closed until opened; once `passing`, new ones
    come open (the device has caught up)."""

    def __init__(self, passing: bool = False) -> None:
        self.made: list[GateEvent] = []
        self.passing = passing

    def __call__(self) -> GateEvent:
        self.made.append(GateEvent(self.passing))
        return self.made[-1]

    def open_all(self) -> None:
        self.passing = True
        for e in self.made:
            e.opened.set()


# ---------------------------------------------------------------------------------------- devices

def test_resolve_device_names_the_cpu_and_refuses_missing_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        resolve_device("gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_to_device_is_the_identity_on_the_cpu_and_maps_dicts():
    x = torch.arange(6).reshape(2, 3)
    assert to_device(x, None) is x and to_device(x, "cpu") is x
    d = to_device({"input_ids": x, "attention_mask": x > 0}, torch.device("cpu"))
    assert d["input_ids"] is x and d["attention_mask"].dtype == torch.bool
    assert host_release_for("cpu") is None  # the CPU keeps the direct path: no thread, no copy


# ---------------------------------------------------------------------------------------- release path

def _ramp_results(bundle, r20, test_images, sites=(1, 4, 7), n=4):
    """Real ramp results of a real forward pass (ResNet-20), in execution order."""
    x = r20.encode([test_images.item(i).input for i in range(n)])
    ee = bundle.early_exit_model()
    try:
        out = ee(x, active=sites)
    finally:
        ee.remove_hooks()
    return [out.ramps[s] for s in sites]


def test_waiter_releases_in_order_once_each_after_its_event(r20_bundle, r20, test_images):
    results = _ramp_results(r20_bundle, r20, test_images)
    expect = {r.site: np.asarray(r.conf).copy() for r in results}
    for r in results:  # fresh, unscored results: what the hook hands over
        r._conf = r._pred = None
    gates = Gates()
    host = HostRelease(torch.device("cpu"), event=gates)
    seen: list[tuple[int, str, object]] = []
    try:
        launch = host.bind(lambda r: seen.append((r.site, threading.current_thread().name, r.conf)))
        for r in results:
            launch(r)  # returns at once: the model runs on while no event has passed
        assert seen == [] and len(gates.made) == 3 and all(e.recorded for e in gates.made)
        gates.made[2].opened.set()  # the later events pass first: releases still go in launch order
        gates.made[1].opened.set()
        assert seen == []  # the waiter is still on the first ramp's event
        gates.open_all()
        host.finish()  # waits for the three callbacks and its own end event
        assert len(gates.made) == 4
    finally:
        gates.open_all()
        host.close()
    assert [s for s, _, _ in seen] == [1, 4, 7]  # in launch order, each exactly once
    assert {t for _, t, _ in seen} == {"apparate-host-release"}  # on the waiter, not the engine thread
    for s, _, conf in seen:
        assert np.allclose(conf, expect[s])  # read from the host copy: the same answers
    assert all(r.logits.device.type == "cpu" for r in results)


def test_a_failing_callback_ends_the_batch_without_hanging(r20_bundle, r20, test_images):
    results = _ramp_results(r20_bundle, r20, test_images)
    host = HostRelease(torch.device("cpu"), event=Gates(passing=True))
    calls: list[int] = []

    def callback(r) -> None:
        calls.append(r.site)
        if r.site == 4:
            raise RuntimeError("release failed on purpose")

    try:
        launch = host.bind(callback)
        for r in results:
            launch(r)
        with pytest.raises(RuntimeError, match="on purpose"):
            host.finish()
        assert calls == [1, 4]  # the batch's later ramps are skipped after a failure
        launch = host.bind(lambda r: calls.append(-r.site))  # the next batch starts clean
        launch(results[0])
        host.finish()
        assert calls[-1] == -1
    finally:
        host.close()


def test_abandon_after_a_failed_forward_keeps_no_error(r20_bundle, r20, test_images):
    results = _ramp_results(r20_bundle, r20, test_images, sites=(2,))
    host = HostRelease(torch.device("cpu"), event=Gates(passing=True))
    try:
        host.bind(lambda r: 1 / 0)(results[0])
        host.abandon()  # the forward's own error is the one that counts: the callback's is dropped
        with pytest.raises(RuntimeError, match="not finished"):
            host.bind(print)
            host.bind(print)
    finally:
        host.abandon()
        host.close()


# ---------------------------------------------------------------------------------------- models and profiles

def test_moving_the_early_exit_model_rebuilds_its_fast_ramps(r20_bundle, r20, test_images):
    x = r20.encode([test_images.item(i).input for i in range(4)])
    ee = r20_bundle.early_exit_model()
    try:
        ref = {s: r.logits.clone() for s, r in ee(x, active=(0, 5)).ramps.items()}
        ee.double()  # `_apply`, as `.to(device)` is: the ramps' weights are new tensors
        assert all(p.dtype == torch.float64 for p in ee.ramps.parameters())
        got = ee(x.double(), active=(0, 5)).ramps
        for s in ref:  # the hooks run the rebuilt fast ramps, on the moved weights
            assert got[s].logits.dtype == torch.float64
            assert torch.allclose(got[s].logits.float(), ref[s], atol=1e-4)
    finally:
        ee.remove_hooks()
        ee.float()


def test_bundle_loaded_onto_the_cpu_names_its_device(r20_bundle, r20):
    from apparate.model.bundle import load_bundle

    b = load_bundle(r20_bundle.path, model=r20.model, device="cpu")
    assert b.device == torch.device("cpu")
    ee = b.early_exit_model()
    try:
        assert all(p.device.type == "cpu" for p in ee.parameters())
    finally:
        ee.remove_hooks()
    assert b.profile.device == "cpu"  # profiled on the CPU by `prepare_model`
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_bundle(r20_bundle.path, model=r20.model, device="cuda")


def test_profile_records_its_device_and_old_ones_read_as_cpu():
    p = LatencyProfile.linear(3)
    assert p.device == "cpu"
    d = LatencyProfile(p.batch_sizes, p.site_ms, p.ramp_ms, p.vanilla_ms, device="cuda:0").to_dict()
    assert d["device"] == "cuda:0"
    q = LatencyProfile.from_dict(d)
    assert q.device == "cuda:0" and q.updated(1, {0: 1.0}, {}).device == "cuda:0"
    old = dict(d)
    del old["device"]  # a bundle from before devices were named
    assert LatencyProfile.from_dict(old).device == "cpu"


# ---------------------------------------------------------------------------------------- CUDA only

@needs_cuda
def test_cuda_release_path_matches_the_direct_one(r20_bundle, r20, test_images):
    x = r20.encode([test_images.item(i).input for i in range(8)])
    ee = r20_bundle.early_exit_model()
    try:
        direct = {s: (r.conf.copy(), r.pred.copy()) for s, r in ee(x, active=(1, 4, 7)).ramps.items()}
        ee.to("cuda")
        host = host_release_for("cuda")
        seen: dict[int, tuple] = {}
        try:
            out = ee(to_device(x, "cuda"), on_ramp=host.bind(lambda r: seen.__setitem__(r.site, (r.conf, r.pred))),
                     active=(1, 4, 7))
            host.finish()
        finally:
            host.close()
        assert list(seen) == [1, 4, 7] and out.final_pred.device.type == "cuda"
        for s, (c, p) in seen.items():
            assert np.allclose(c, direct[s][0], atol=1e-4) and np.array_equal(p, direct[s][1])
    finally:
        ee.remove_hooks()
        ee.to("cpu")


@needs_cuda
def test_cuda_profile_is_timed_on_the_device(r20_bundle, r20, test_images):
    from apparate.model.profiler import profile_latency

    model = r20.model.to("cuda")
    try:
        ramps = [r.to("cuda") for r in r20_bundle.ramps]
        prof = profile_latency(model, r20_bundle.sites, ramps, lambda b, _l: r20.encode(
            [test_images.item(i).input for i in range(b)]), (1, 4), warmup=1, repeats=2, progress=False)
        assert prof.device.startswith("cuda:") and np.all(prof.vanilla_ms > 0)
    finally:
        model.to("cpu")
        for r in r20_bundle.ramps:
            r.to("cpu")
