import numpy as np
import pytest
import torch

from apparate.model.profiler import num_threads, powers_of_two, profile_latency
from apparate.model.ramps import RampSpec, build_ramps
from apparate.model.sites import find_sites
from tests.conftest import SENTENCES


def test_powers_of_two():
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert powers_of_two(24) == [1, 2, 4, 8, 16, 24]
    with pytest.raises(ValueError):
        powers_of_two(0)


def test_profile_is_monotone_in_depth_and_batch_size(r20_bundle):
    p = r20_bundle.profile
    assert list(p.batch_sizes) == [1, 2, 4]
    assert p.num_sites == 9
    assert np.all(np.diff(p.site_ms, axis=2) >= 0)  # grows with depth
    assert np.all(np.diff(p.site_ms, axis=1) >= 0)  # grows with batch size
    assert np.all(np.diff(p.vanilla_ms, axis=1) >= 0)
    assert np.all(p.site_ms[..., -1] <= p.vanilla_ms)
    assert np.all(p.ramp_ms > 0)
    assert p.site_ms[0, 0, -1] > p.site_ms[0, 0, 0]  # the last block really is later


def test_text_profile_has_length_buckets(minilm_base):
    model, enc = minilm_base
    sites = find_sites(model, enc(SENTENCES[:2]))
    ramps = build_ramps([RampSpec("cls", s.shape, 2) for s in sites])

    def make(b, length):
        return enc(SENTENCES[:b], pad_to=length)

    p = profile_latency(model, sites, list(ramps), make, [1, 2], lengths=[8, 32], warmup=1, repeats=2,
                        threads=1, progress=False)
    assert p.site_ms.shape == (2, 2, 6)
    assert list(p.lengths) == [8, 32]
    assert np.all(np.diff(p.site_ms, axis=0) >= 0)  # longer inputs never cost less


def test_threads_are_restored():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_served_ramp_cost_counts_each_active_site(r20_bundle):
    """One served run times every site's hook, leaves nothing attached, and the costs apportioned
    from it add up to what the run cost over the bare pass, split by those times."""
    from apparate.model.profiler import PAID_SHARE, apportion, served_ramp_ms
    from apparate.zoo.cifar_resnet import normalize

    ee = r20_bundle.early_exit_model()
    modules = dict(ee.backbone.named_modules())
    x = normalize(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        inside, total = served_ramp_ms(ee, x)
    assert inside.shape == (r20_bundle.num_sites,) and np.all(inside > 0) and total > 0
    assert not any(modules[s.name]._forward_hooks for s in r20_bundle.sites)  # nothing left attached
    paid = 0.5 * float(inside.sum())
    cost = apportion(inside, paid)
    assert cost.sum() == pytest.approx(paid) and np.allclose(cost / cost.sum(), inside / inside.sum())
    # a noisy, negative difference of two passes cannot make the ramps free
    assert np.allclose(apportion(inside, -1.0), inside * PAID_SHARE[0])


def test_bench_ramps_reports_every_site(r20_bundle, data_dir):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "apparate", "bench", "ramps", str(r20_bundle.path), "--rounds", "2",
                          "--inner", "2", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("|") and "layer" in line]
    assert len(rows) == r20_bundle.num_sites
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        in_model, in_hook, module, lean = (float(c) for c in cells[3:7])
        assert in_model > 0 and in_hook > 0 and module > 0 and lean > 0
    assert "torch threads 1" in out.stdout and "command: apparate bench ramps" in out.stdout
