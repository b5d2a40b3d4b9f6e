"""Invariants of the engine's parts, checked with hypothesis on real components."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import encode_images, served_cnn


# ---------------------------------------------------------------------------------------------- queue

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.lists(st.integers(0, 12), max_size=4), st.integers(0, 5)),
                max_size=12), st.integers(1, 10))
def test_queue_matches_a_list_model(ops, limit):
    from apparate.serve.queue import QUEUE_FULL, Refused, RequestQueue
    from apparate.serve.requests import Request

    q = RequestQueue(limit)
    model: list[int] = []
    counter = 0
    for put, drop, take in ops:
        reqs = [Request(counter + i, 1, float(counter + i), 0.0) for i in range(put)]
        if len(model) + put > limit:
            with pytest.raises(Refused) as e:
                q.put_all(reqs)
            assert e.value.reason == QUEUE_FULL
        else:
            q.put_all(reqs)
            model += [r.item for r in reqs]
        counter += put
        items, arr, _, _ = q.snapshot()
        assert [r.item for r in items] == model and arr.tolist() == [float(x) for x in model]
        drop = sorted({d for d in drop if d < len(model)})
        dropped, taken = q.remove(drop, take)
        expect_drop = [model[d] for d in drop]
        rest = [x for i, x in enumerate(model) if i not in set(drop)]
        assert [r.item for r in dropped] == expect_drop
        assert [r.item for r in taken] == rest[:take]
        model = rest[take:]
        assert len(q) == len(model) <= limit


# ---------------------------------------------------------------------------------------------- costs

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 130), st.sets(st.integers(0, 5), max_size=4), st.integers(0, 2**31 - 1))
def test_batch_costs_match_the_profile(b, length, sites, seed):
    from apparate.core.profile import LatencyProfile
    from apparate.serve.costs import BatchCosts

    rng = np.random.default_rng(seed)
    L, B, S = np.array([16, 32, 64, 128]), np.array([1, 2, 4, 8, 16]), 6
    site = np.sort(rng.uniform(0.5, 5, (4, 5, S)), axis=2)
    site = np.maximum.accumulate(np.maximum.accumulate(site * np.arange(1, 6)[None, :, None], axis=1), axis=0)
    prof = LatencyProfile(B, site, rng.uniform(0, 0.2, (4, 5, S)), site[..., -1] + rng.uniform(0.1, 2, (4, 5)), L)
    sites = sorted(sites)
    costs = BatchCosts.build(prof, sites, 24, max_tokens=130, overhead_ms=0.5)
    assert costs.batch_ms(b, length) == pytest.approx(prof.table(b, sites, length).end_ms + 0.5, rel=1e-12)
    # the batcher's view: padded to the longest of the b oldest
    lens = rng.integers(1, 131, size=b)
    assert costs.exec_ms(lens)(b) == pytest.approx(prof.table(b, sites, int(lens.max())).end_ms + 0.5, rel=1e-12)


# ---------------------------------------------------------------------------------------------- scheduler

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0.001, 0.5)), min_size=1, max_size=20), st.sampled_from(["clockwork", "tfserving"]),
       st.booleans())
def test_scheduler_drops_exactly_the_late_and_batches_the_rest(reqs, kind, shed):
    from apparate.core.profile import LatencyProfile
    from apparate.core.batchers import finish_time
    from apparate.serve.costs import BatchCosts
    from apparate.serve.scheduler import BatchingOptions, Scheduler

    arrivals = np.sort(np.array([a for a, _ in reqs]))
    deadlines = arrivals + np.array([s for _, s in reqs])
    now = float(arrivals[-1]) + 0.01
    costs = BatchCosts.build(LatencyProfile.linear(3, vanilla_ms=20), (1,), 4)
    sched = Scheduler(BatchingOptions(kind, 4, shed, batch_timeout_ms=2.0))
    step = sched.decide(now, arrivals, deadlines, np.ones(arrivals.size, dtype=np.int64), costs)
    late = finish_time(now, costs.batch_ms(1)) > deadlines
    dropped = {i for i, _ in step.drops}
    if shed and late.all():  # an idle worker runs the newest anyway (a fresh measurement)
        assert dropped == set(range(arrivals.size - 1)) and step.start == 1
    elif shed:
        assert {int(i) for i in np.flatnonzero(late)} <= dropped
        assert all(why in ("late", "predicted late", "queue full") for _, why in step.drops)
        # `late` only for a request whose deadline has passed; earlier drops say they are predicted
        assert all(deadlines[i] <= now for i, why in step.drops if why == "late")
        assert all(deadlines[i] > now for i, why in step.drops if why == "predicted late")
    else:
        assert all(why not in ("late", "predicted late") for _, why in step.drops)
    assert 0 <= step.start <= min(4, arrivals.size - len(dropped))
    if kind == "clockwork" and arrivals.size > len(dropped):
        assert step.start >= 1  # work-conserving


# ---------------------------------------------------------------------------------------------- executor

@pytest.fixture(scope="module")
def executor_parts(tiny_cnn):
    from apparate.serve.executor import Executor

    served = served_cnn(tiny_cnn)
    released: list = []
    ex = Executor(served, lambda pairs: released.extend(pairs))
    yield served, ex, released
    ex.close()
    served.ee.remove_hooks()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 8), st.lists(st.floats(0, 1), min_size=2, max_size=2), st.sets(st.integers(0, 1), min_size=0),
       st.integers(0, 1000))
def test_every_input_is_released_once_at_its_first_confident_ramp(executor_parts, n, thr, sites, seed):
    from apparate.core.controller import Config, Feedback
    from apparate.core.exits import first_exit
    from apparate.serve.requests import Answer, Request

    served, ex, released = executor_parts
    released.clear()
    sites = tuple(sorted(sites))
    cfg = Config(sites, tuple(thr[: len(sites)]), 3)
    g = torch.Generator().manual_seed(seed)
    reqs = [Request(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g), 1, time.perf_counter(), 1e18,
                    concurrent.futures.Future()) for _ in range(n)]
    with torch.inference_mode():
        rep = ex.run(reqs, cfg, time.perf_counter())
    assert sorted(id(r) for r, _ in released) == sorted(id(r) for r in reqs)  # each exactly once
    assert served.ee.active == sites  # the served ramps stay attached between batches
    got = {id(r): a for r, a in released}
    assert all(isinstance(a, Answer) and a.version == 3 for a in got.values())
    expect = first_exit(1.0 - rep.conf, np.asarray(cfg.thresholds))
    assert rep.exit_pos.tolist() == expect.tolist()
    fb_idx, fb_ok = Feedback(cfg.sites, cfg.thresholds, rep.conf, rep.agree).released()
    assert fb_idx.tolist() == expect.tolist() and fb_ok.tolist() == rep.released_agree.tolist()
    final = served.ee(served.codec.encode([r.item for r in reqs])).final_pred.numpy()
    for i, r in enumerate(reqs):
        a = got[id(r)]
        j = expect[i]
        assert a.exit_site == (sites[j] if j < len(sites) else -1) and a.early == (j < len(sites))
        if j == len(sites):
            assert a.label == final[i]  # late answers are the original model's
        assert a.latency_ms == pytest.approx(a.queue_ms + a.compute_ms, abs=1e-6)
    assert set(rep.site_ms) == set(rep.ramp_ms) == set(sites) and rep.vanilla_ms > 0


def test_image_codec_parses_what_it_documents():
    from apparate.serve.model_io import ImageCodec

    codec = ImageCodec(encode_images, (8, 8, 3))
    data = np.arange(2 * 8 * 8 * 3) % 256
    items, costs = codec.parse({"name": "input", "datatype": "UINT8", "shape": [2, 8, 8, 3], "data": data.tolist()})
    assert costs == [1, 1] and items[0].shape == (8, 8, 3) and items[0].dtype == np.uint8  # no torch op yet
    assert np.array_equal(items[1], data.reshape(2, 8, 8, 3)[1])
    f_items, _ = codec.parse({"name": "input", "datatype": "FP32", "shape": [8, 8, 3],
                              "data": data[:192].astype(float).tolist()})
    # encoded on the engine thread as [C, H, W]; UINT8 and FP32 inputs of one batch agree, and
    # in-process callers' [C, H, W] tensors mix with them
    x = codec.encode([items[0], f_items[0]])
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x[1], codec.encode([items[0]])[0])
    chw = torch.as_tensor(data.reshape(2, 8, 8, 3)[1], dtype=torch.uint8).permute(2, 0, 1)
    assert torch.equal(codec.encode([chw, items[1]])[0], codec.encode([items[1]])[0])


def test_hf_text_codec_counts_and_encodes_with_separate_tokenizers():
    """Fast tokenizers change shared truncation/padding state on every call: the HTTP thread
    (counting) and the engine thread (encoding) must not share one."""
    from apparate.serve.model_io import hf_text_codec
    from apparate.zoo import minilm
    from apparate.zoo.text_workloads import TextEncoder

    enc = TextEncoder(minilm.load_tokenizer(minilm.base_model_dir()))
    codec = hf_text_codec(enc, max_tokens=8, long_text="truncate")
    assert codec.count_tokenizer is not enc.tok
    items, costs = codec.parse({"name": "text", "datatype": "BYTES", "shape": [2],
                                "data": ["a fine film", "one two three four five six seven eight nine ten"]})
    assert costs == [5, 8]  # [CLS] a fine film [SEP]; the long one cut to the limit
    x = codec.encode(items)
    assert x["input_ids"].shape == (2, 8) and codec.length(x) == 8.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.one_of(st.none(), st.integers(4, 64))), min_size=1, max_size=6),
       st.integers(0, 1000))
def test_pooled_feedback_is_the_batches_stacked(batches, seed):
    from apparate.serve.feedback import merged_feedback as _merged
    from apparate.serve.executor import BatchReport

    rng = np.random.default_rng(seed)
    text = batches[0][1] is not None
    reps = []
    for n, length in batches:
        conf = rng.uniform(0, 1, (n, 2))
        agree = rng.uniform(0, 1, (n, 2)) < 0.7
        reps.append(BatchReport((1, 4), (0.1, 0.2), 0, conf, agree, np.full(n, 2), np.ones(n, bool), np.zeros(n), n,
                                float(length or 16) if text else None))
    fb = _merged(reps)
    assert np.array_equal(fb.conf, np.concatenate([r.conf for r in reps]))
    assert np.array_equal(fb.agree, np.concatenate([r.agree for r in reps]))
    assert fb.sites == (1, 4) and fb.thresholds == (0.1, 0.2)
    if text:
        n = sum(r.batch_size for r in reps)
        assert fb.length == pytest.approx(sum(r.length * r.batch_size for r in reps) / n)
    else:
        assert fb.length is None


@pytest.mark.parametrize("learned", [False, True])
def test_calibration_sets_ramp_costs_to_what_the_hook_pays(tiny_cnn, learned):
    """Every ramp's cost is timed in the model as served: at small batches (up to ALONE_UP_TO)
    each ramp alone (its cold cost right after its stage), at larger sizes all at once; the
    learned rule's passes score in the hook (a threshold above 0) without releasing anything.
    Every other profiled size takes its costs from the timed ones: interpolated between them,
    scaled above them (none keeps the bundle's prepared costs, which a server would otherwise
    place ramps by)."""
    from apparate.serve.calibrate import ALONE_UP_TO, calibrate_ramps, calibration_sizes
    from apparate.serve.executor import Executor

    served = served_cnn(tiny_cnn)
    released = []
    ex = Executor(served, released.extend)
    runs = []
    run = ex.run
    ex.run = lambda batch, cfg, *a, **k: (runs.append((len(batch), cfg, a[1] if len(a) > 1 else None)),
                                          run(batch, cfg, *a, **k))[1]
    try:
        before = served.profile
        after = calibrate_ramps(ex, before, [1, 2, 8], repeats=2, learned=learned)
    finally:
        ex.close()
        served.ee.remove_hooks()
    S = served.num_sites
    for b in (1, 2):
        assert sorted({cfg.sites for n, cfg, _ in runs if n == b}) == [(s,) for s in range(S)]
    assert {cfg.sites for b, cfg, _ in runs if b == 8} == {tuple(range(S))}
    assert all((min(cfg.thresholds) > 0) == learned and (sc is not None) == learned for _, cfg, sc in runs)
    assert released and not any(ans.early for _, ans in released)  # every input ran to the end
    for b in (1, 8):
        assert after.at(b)[1].shape == before.at(b)[1].shape
        assert (after.at(b)[1] > 0).all()
        assert np.allclose(after.at(b)[0], before.at(b)[0]) and after.vanilla(b) == before.vanilla(b)
    assert [int(b) for b in before.batch_sizes] == [1, 2, 4, 8] and ALONE_UP_TO == 4
    assert calibration_sizes(before, 8) == [1, 4, 8] and calibration_sizes(before, 2) == [1, 2]
    # batch 4, between the timed 2 and 8, along the batch size
    assert np.allclose(after.at(4)[1], (2 / 3) * after.at(2)[1] + (1 / 3) * after.at(8)[1])


def test_calibration_fills_the_sizes_it_did_not_time():
    """Between two timed sizes a ramp's cost is interpolated along the batch size; above the
    largest, the prepared costs are scaled as the largest timed size's were."""
    from apparate.core.profile import LatencyProfile
    from apparate.serve.calibrate import fill_between

    S, bs = 3, np.array([1, 2, 4, 8, 16])
    site = np.cumsum(np.ones((1, bs.size, S)), axis=2) * bs[None, :, None]
    prepared = LatencyProfile(bs, site, np.full((1, bs.size, S), 0.01) * bs[None, :, None], bs[None, :] * 4.0)
    timed = prepared.updated(1, {}, {0: 0.2, 1: 0.3, 2: 0.4}, None, None, 1.0).updated(
        4, {}, {0: 0.5, 1: 0.6, 2: 0.7}, None, None, 1.0)
    out = fill_between(prepared, timed, [1, 4])
    assert np.allclose(out.at(1)[1], [0.2, 0.3, 0.4]) and np.allclose(out.at(4)[1], [0.5, 0.6, 0.7])
    assert np.allclose(out.at(2)[1], [0.3, 0.4, 0.5])  # a third of the way from 1 to 4
    for b in (8, 16):  # the prepared shape (0.01 * b), at the level timed at 4 (x 0.5/0.04 ...)
        assert np.allclose(out.at(b)[1], 0.01 * b * np.array([0.5, 0.6, 0.7]) / 0.04)
    assert np.array_equal(out.site_ms, prepared.site_ms) and np.array_equal(out.vanilla_ms, prepared.vanilla_ms)


# ---------------------------------------------------------------------------------------------- live stats

@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(-1, 3), st.booleans()), min_size=1, max_size=12), max_size=15),
       st.integers(1, 20))
def test_live_window_accuracy_is_that_of_the_last_answers(batches, window):
    from apparate.serve.metrics import LiveStats

    live = LiveStats(num_sites=4, window=window)
    seen: list[tuple[int, bool]] = []
    for batch in batches:
        exits = np.array([e for e, _ in batch])
        agree = np.array([a for _, a in batch])
        acc = live.record(exits, agree)
        seen += batch
        last = [a for _, a in seen[-window:]]
        assert acc == pytest.approx(sum(last) / len(last))
    totals = live.snapshot()["total"]["exits"]
    for s in range(-1, 4):
        assert totals.get("final" if s < 0 else str(s), 0) == sum(e == s for e, _ in seen)


_batch = st.lists(st.tuples(st.integers(-1, 3), st.booleans(), st.floats(0, 3), st.floats(0, 1), st.booleans()),
                  min_size=1, max_size=10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_batch, st.booleans(), st.booleans()), max_size=90))
def test_metrics_recorded_in_bulk_read_as_recorded_one_by_one(batches):
    """Batches handed over are recorded in bulk (every FOLD_EVERY, and on any read); whatever is
    read equals what prometheus_client's own metrics give, fed value by value as it came."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.utils import floatToGoString

    from apparate.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, ServeMetrics

    m = ServeMetrics(num_sites=4, window=16)
    m.set_objectives(1.0, 0.01)
    ref = CollectorRegistry()
    hists = {"apparate_request_latency_seconds": Histogram("a", "", buckets=LATENCY_BUCKETS, registry=ref),
             "apparate_queue_wait_seconds": Histogram("b", "", buckets=LATENCY_BUCKETS, registry=ref),
             "apparate_batch_size": Histogram("c", "", buckets=BATCH_BUCKETS, registry=ref),
             "apparate_batch_seconds": Histogram("d", "", buckets=LATENCY_BUCKETS, registry=ref)}
    exits: dict[str, int] = {}  # every input's exit (the counter)
    live_exits = {"final": 0}  # those whose agreement is known (the live statistics)
    agreed = [0, 0]
    window: list[bool] = []
    for batch, early_stop, read in batches:
        e = np.array([r[0] for r in batch])
        a = np.array([r[1] for r in batch])
        lat = np.array([r[2] for r in batch])
        wait = np.array([r[3] for r in batch])
        known = np.array([r[4] for r in batch]) if early_stop else None
        m.batch_done(e, a, lat, wait, float(lat.max()), known)
        for v in lat:
            hists["apparate_request_latency_seconds"].observe(v)
        for v in wait:
            hists["apparate_queue_wait_seconds"].observe(v)
        hists["apparate_batch_size"].observe(len(batch))
        hists["apparate_batch_seconds"].observe(float(lat.max()))
        for s in e.tolist():
            key = "final" if s < 0 else str(s)
            exits[key] = exits.get(key, 0) + 1
        kept = a if known is None else a[known]
        for s in (e if known is None else e[known]).tolist():
            key = "final" if s < 0 else str(s)
            live_exits[key] = live_exits.get(key, 0) + 1
        agreed[0] += int(kept.sum())
        agreed[1] += int(kept.size - kept.sum())
        window = (window + kept.tolist())[-16:]
        if read:  # a read records everything handed over so far
            get = m.registry.get_sample_value
            for name, h in hists.items():
                for b in h._upper_bounds:
                    le = floatToGoString(b)
                    assert get(f"{name}_bucket", {"le": le}) == ref.get_sample_value(
                        f"{h._name}_bucket", {"le": le}), (name, le)
                assert get(f"{name}_count") == ref.get_sample_value(f"{h._name}_count")
                assert get(f"{name}_sum") == pytest.approx(ref.get_sample_value(f"{h._name}_sum"))
            for key, n in exits.items():
                assert get("apparate_exits_total", {"site": key}) == n
            assert (get("apparate_released_total", {"agree": "true"}) or 0) == agreed[0]
            assert (get("apparate_released_total", {"agree": "false"}) or 0) == agreed[1]
            assert m.snapshot()["total"]["exits"] == live_exits
            if window:
                assert get("apparate_window_accuracy") == pytest.approx(sum(window) / len(window))
    assert m.snapshot()["total"]["batches"] == len(batches)


# ---------------------------------------------------------------------------------------------- decoding

_numbers = st.one_of(st.integers(-300, 300), st.floats(allow_nan=False, allow_infinity=False, width=32))


_PREFIXES = ["", '"id": "\\"data\\": [1, 2]", ', '"parameters": {"data": [4, 5, 6]}, ', '"data": "[", ']


@settings(max_examples=80, deadline=None)
@given(st.lists(_numbers, max_size=300), st.sampled_from(["", " ", "\n  "]), st.integers(8, 64),
       st.dictionaries(st.sampled_from(["id", "note", "data"]), st.text(max_size=20), max_size=2),
       st.sampled_from(_PREFIXES))
def test_piecewise_json_decoding_equals_json_loads(values, blank, piece, extra, prefix):
    """Decoded piece by piece or at once, a request is the same (the array as a numpy array),
    whatever else in it looks like a data array."""
    import json

    from apparate.serve.protocol import decode_json

    data = ("[" + ("," + blank).join(json.dumps(v) for v in values) + blank + "]")
    body = ("{" + prefix + '"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ' + data + "}]"
            + "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items()) + "}").encode()
    plain = json.loads(body)
    got = decode_json(body, piecewise=True, piece_bytes=piece)
    arr = got["inputs"][0]["data"]
    assert np.array_equal(np.asarray(arr, dtype=np.float64).reshape(-1), np.asarray(plain["inputs"][0]["data"],
                                                                                     dtype=np.float64).reshape(-1))
    got["inputs"][0]["data"] = plain["inputs"][0]["data"]
    assert got == plain


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"data": [1, 2, 3,]}]}' + b" " * 200,  # a trailing comma
    b'{"inputs": [{"data": [1, 2, , 3]}]}' + b" " * 200,
    b'{"inputs": [{"data": [1, 2, 3]}]' + b" " * 200,  # the object is not closed
])
def test_piecewise_json_decoding_refuses_what_json_loads_refuses(body):
    import json

    from apparate.serve.protocol import decode_json

    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(ValueError):
        decode_json(body, piecewise=True, piece_bytes=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=64), st.floats(0.0, 0.99))
def test_the_engines_quantile_is_numpys(values, q):
    from apparate.serve.batch_times import quantile_sorted

    v = np.sort(np.asarray(values))
    assert abs(quantile_sorted(v, q) - float(np.quantile(v, q))) <= 1e-9 * max(1.0, float(v.max()))


@pytest.mark.parametrize("mapped", [False, True])
def test_final_confidence_is_the_max_softmax_in_the_target_label_space(mapped):
    from apparate.serve.report import LabelMap, final_confidence

    logits = torch.tensor(np.random.default_rng(1).normal(size=(8, 10)) * 5, dtype=torch.float32)
    p = torch.softmax(logits, -1)
    label_map = np.array([0, 0, 1, 1, 1, 1, 0, 0, 1, 1]) if mapped else None
    if mapped:  # mapped classes summed: the vehicle task's "vehicle or not"
        p = torch.stack([p[:, label_map == 0].sum(1), p[:, label_map == 1].sum(1)], 1)
    got = final_confidence(logits, LabelMap.of(label_map, 2 if mapped else 10))
    assert got.shape == (8,) and np.allclose(got, p.max(-1).values.numpy(), atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(2, 40), st.floats(0.01, 60.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_final_confidence_is_the_largest_target_probability(n, k, scale, mapped, seed):
    """Both ways of computing it (plain floats for a small output, numpy for a large one) give the
    largest probability in the target label space; numpy's is bit for bit the full softmax's."""
    from apparate.serve.report import SMALL_OUTPUT, LabelMap, final_confidence

    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, k)) * scale).astype(np.float32)
    groups = rng.integers(0, 3, size=k) if mapped else None
    e = np.exp(z.astype(np.float64) - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    if mapped:
        p = np.stack([p[:, groups == c].sum(axis=1) for c in range(3)], axis=1)
    got = final_confidence(torch.from_numpy(z), LabelMap.of(groups, 3) if mapped else None)
    assert got.shape == (n,) and np.allclose(got, p.max(axis=-1), rtol=1e-6, atol=0)
    if z.size > SMALL_OUTPUT and not mapped:  # numpy: the very float32 the softmax holds
        e32 = np.exp(z - z.max(axis=-1, keepdims=True))
        assert np.array_equal(got, (e32 / e32.sum(axis=-1, keepdims=True)).max(axis=-1))
