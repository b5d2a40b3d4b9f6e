"""`bench spread`: the same policies over several draws of the arrivals, per settings variant."""

import json
import subprocess
import sys

import numpy as np

from apparate.bench.experiment import ExperimentSpec, make_trace


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "apparate", *args], capture_output=True, text=True, timeout=600)


def test_a_real_trace_is_rotated_by_its_seed_and_keeps_its_gaps(data_dir):
    spec = ExperimentSpec(workload="x", data_dir=str(data_dir), trace="azure", rate=20.0)
    plain = make_trace(spec, 500).times
    assert np.array_equal(make_trace(spec, 500).times, plain)  # no trace seed: the trace as it is
    a = make_trace(ExperimentSpec(**{**spec.__dict__, "trace_seed": 1}), 500)
    b = make_trace(ExperimentSpec(**{**spec.__dict__, "trace_seed": 2}), 500)
    assert a.times.size == plain.size and "rotated" in a.note
    assert not np.array_equal(a.times, plain) and not np.array_equal(a.times, b.times)
    # the same gaps, in the same cyclic order, from another starting point
    g, ga = np.diff(plain), np.diff(a.times)
    k = int(a.note.rsplit(" ", 1)[1])
    assert np.allclose(ga, np.roll(g, -k))
    # a synthetic trace is drawn anew
    p = ExperimentSpec(workload="x", trace="poisson", rate=50.0)
    assert not np.array_equal(make_trace(ExperimentSpec(**{**p.__dict__, "trace_seed": 3}), 200).times,
                              make_trace(p, 200).times)


def test_spread_replays_each_variant_on_each_draw(r20_bundle, data_dir, tmp_path):
    out = tmp_path / "sp"
    args = ["bench", "spread", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
            "--stream", "test", "--n", "96", "--trace", "poisson", "--rate", "300", "--draws", "3",
            "--policies", "apparate,branchynet", "--reference", "branchynet",
            "--variant", "raw:agreement=raw,margin_z=1", "--no-progress", "--out", str(out)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "spread.json").read_text())
    assert data["draws"] == 3
    rows = {(r["policy"], r["variant"]): r for r in data["results"]}
    # the baselines are tuned by their own rules: shown once; apparate once per variant
    assert set(rows) == {("vanilla", "default"), ("apparate", "default"), ("apparate", "raw"),
                         ("branchynet", "default"), ("optimal", "default")}
    assert rows[("apparate", "raw")]["changes"] == {"agreement": "raw", "margin_z": 1}
    for r in rows.values():
        assert len(r["runs"]) == 3
    # the draws differ: the oracle's median moves with the arrivals
    assert len({round(x["p50_ratio"], 9) for x in rows[("optimal", "default")]["runs"]}) > 1
    assert all(x["p50_ratio"] == 1.0 for x in rows[("vanilla", "default")]["runs"])
    assert (out / "spread.png").stat().st_size > 1000
    assert "beats branchynet" in (out / "spread.md").read_text()
    # a bad variant fails before any replay, saying why
    bad = run_cli(*args[:-2], "--variant", "oops", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "LABEL:NAME=VALUE" in bad.stderr
    bad = run_cli(*args[:-2], "--variant", "x:margin_z=-1", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "margin_z" in bad.stderr


def test_a_fixed_trace_has_one_draw(r20_bundle, data_dir, tmp_path):
    res = run_cli("bench", "spread", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "48", "--trace", "fixed", "--rate", "30", "--draws", "4",
                  "--policies", "apparate", "--reference", "apparate", "--no-progress", "--out", str(tmp_path / "f"))
    assert res.returncode == 0, res.stderr
    assert "no randomness: one draw" in res.stdout
    assert json.loads((tmp_path / "f" / "spread.json").read_text())["draws"] == 1
