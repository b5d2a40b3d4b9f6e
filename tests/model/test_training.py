import numpy as np
import torch

from apparate.model.ramps import RampSpec, build_ramps
from apparate.model.sites import find_sites
from apparate.model.training import TrainConfig, collect_activations, train_ramps
from tests.conftest import SENTENCES


def test_ramps_learn_and_agreement_rises_with_depth(r20_bundle):
    sites = r20_bundle.metrics["sites"]
    held = [s["holdout_agreement"] for s in sites]
    assert held[-1] > 0.90  # the last block's ramp all but matches the model
    assert np.mean(held[-3:]) > np.mean(held[:3])  # rises with depth overall
    rec = r20_bundle.recording
    assert rec.num_inputs == 100 and rec.num_sites == 9
    assert np.all((rec.conf >= 0) & (rec.conf <= 1))
    assert abs(rec.agree[:, -1].mean() - held[-1]) < 1e-6


def test_training_targets_are_the_models_answers_not_labels(r20, test_images):
    stream = test_images.take(slice(0, 60))
    sites = find_sites(r20.model, r20.encode([stream.item(0).input]))
    ramps = build_ramps([RampSpec("pool", s.shape, 10) for s in sites])
    cache = collect_activations(r20.model, sites, list(ramps), r20.batches(stream, 32), progress=False)
    with torch.no_grad():
        preds = r20.model(r20.encode([it.input for it in stream])).argmax(-1)
    assert torch.equal(cache.final_pred, preds)
    assert (cache.labels == stream.labels).all()


def test_training_is_deterministic_with_a_seed(r20, test_images):
    stream = test_images.take(slice(0, 80))
    sites = find_sites(r20.model, r20.encode([stream.item(0).input]))
    weights = []
    for _ in range(2):
        torch.manual_seed(123)  # different init draws are overridden by the training seed
        ramps = build_ramps([RampSpec("pool", s.shape, 10) for s in sites])
        cache = collect_activations(r20.model, sites, list(ramps), r20.batches(stream, 40), progress=False)
        res = train_ramps(list(ramps), cache, sites, TrainConfig(epochs=3, seed=7), progress=False)
        weights.append([p.detach().clone() for p in ramps.parameters()])
        weights.append(res.recording.conf)
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))
    assert np.array_equal(weights[1], weights[3])


def test_vehicle_target_maps_the_original_answer(data_dir, test_images):
    from apparate.zoo.cifar10 import VEHICLE_MAP
    from apparate.zoo.workloads import get_workload

    w = get_workload("cifar10-vehicle-resnet20", data_dir)
    stream = w.stream("test", n=64)
    assert set(np.unique(stream.labels)) <= {0, 1}
    sites = find_sites(w.model, w.encode([stream.item(0).input]))
    ramps = build_ramps([RampSpec("conv", s.shape, 2) for s in sites])
    cache = collect_activations(w.model, sites, list(ramps), w.batches(stream, 32), w.label_map, progress=False)
    with torch.no_grad():
        ten = w.model(w.encode([it.input for it in stream])).argmax(-1)
    assert torch.equal(cache.final_pred, torch.tensor(VEHICLE_MAP)[ten])
    assert cache.features[0].dim() == 4  # conv ramps cache the full map
    res = train_ramps(list(ramps), cache, sites, TrainConfig(epochs=1, holdout=0.25), progress=False)
    assert set(np.unique(res.recording.pred)) <= {0, 1}


def test_text_ramps_train_on_a_few_sentences(minilm_base):
    from apparate.zoo.workload import Stream

    model, enc = minilm_base
    stream = Stream("s", SENTENCES, np.arange(len(SENTENCES)) % 2, enc.lengths(SENTENCES))
    from apparate.zoo.workload import Workload

    w = Workload("t", "text", model, enc, 2, ("neg", "pos"), {}, "", "cls")
    sites = find_sites(model, enc(SENTENCES[:2]))
    ramps = build_ramps([RampSpec("deebert", s.shape, 2) for s in sites])
    cache = collect_activations(model, sites, list(ramps), w.batches(stream, 8), progress=False)
    assert cache.costs is not None and (cache.costs == enc.lengths(SENTENCES)).all()
    res = train_ramps(list(ramps), cache, sites, TrainConfig(epochs=2, holdout=0.25), progress=False)
    assert res.recording.num_sites == 6 and res.recording.lengths is not None
