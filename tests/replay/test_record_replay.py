"""Record a real bundle's stream, replay it through the commands, and refuse mismatches."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from apparate.core.recording import Recording
from apparate.core.settings import Settings
from apparate.policies.catalog import RampFamily
from apparate.bench.experiment import DEFAULT_POLICIES, ExperimentSpec, run_experiment
from apparate.bench.record import bundle_id, check_recording_matches, record_stream
from apparate.bench.report import comparison_table, write_report


@pytest.fixture(scope="module")
def recorded(r20_bundle, r20):
    stream = r20.stream("test", n=160)
    # the fixture bundle was prepared through the Python API, without its zoo workload attached
    return record_stream(dataclasses.replace(r20_bundle, workload=r20), stream, batch_size=32, progress=False)


def test_recording_has_every_site_and_the_bundles_identity(recorded, r20_bundle):
    assert recorded.conf.shape == (160, r20_bundle.num_sites)
    assert recorded.lengths is None  # images have no cost key
    assert np.all((recorded.conf >= 0) & (recorded.conf <= 1))
    assert recorded.meta["bundle_id"] == bundle_id(r20_bundle.path)
    # the deepest ramp agrees with the original far more often than the first
    agree = recorded.agree.mean(axis=0)
    assert agree[-1] > agree[0]
    check_recording_matches(recorded, r20_bundle.path)


def test_recording_keeps_each_sites_feature_movement_across_batches(recorded, r20_bundle, r20):
    move = recorded.move
    assert move is not None and move.shape == recorded.conf.shape
    assert np.isnan(move[0]).all()  # the first input has no previous one
    assert np.all(np.isfinite(move[1:])) and np.all(move[1:] >= 0)
    # the same stream in batches of another size: the same movement (carried across batches)
    again = record_stream(dataclasses.replace(r20_bundle, workload=r20), r20.stream("test", n=40), batch_size=7,
                          progress=False)
    assert np.allclose(again.move[1:], move[1:40], rtol=1e-4, atol=1e-6)
    # a repeated input does not move: [a, a] at every site
    stream = r20.stream("test", n=1)
    twice = dataclasses.replace(stream, inputs=np.concatenate([stream.inputs[:1]] * 2), labels=np.r_[stream.labels, stream.labels],
                                costs=np.r_[stream.costs, stream.costs], meta={})
    same = record_stream(dataclasses.replace(r20_bundle, workload=r20), twice, batch_size=2, progress=False)
    assert np.allclose(same.move[1], 0.0, atol=1e-6)


def test_recording_round_trip_and_mismatch_refused(recorded, r20_bundle, tmp_path):
    path = recorded.save(tmp_path / "rec.npz")
    back = Recording.load(path)
    assert np.array_equal(back.conf, recorded.conf) and back.meta == recorded.meta
    assert np.array_equal(back.move, recorded.move, equal_nan=True)
    assert np.array_equal(back.take(slice(3, 9)).move, recorded.move[3:9], equal_nan=True)
    other = Recording(back.conf, back.pred, back.final, back.labels, None, back.site_names,
                      {**back.meta, "bundle_id": "0123456789abcdef", "bundle": "/elsewhere"})
    with pytest.raises(ValueError, match="made by bundle /elsewhere"):
        check_recording_matches(other, r20_bundle.path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable recording"):
        Recording.load(tmp_path / "junk.npz")


def test_every_policy_replays_on_the_real_recording(recorded, r20_bundle, tmp_path):
    fam = RampFamily(r20_bundle.recording, recorded, r20_bundle.profile)
    spec = ExperimentSpec(workload="cifar10-resnet20", rate=100.0, trace="poisson", settings=Settings(), progress=False)
    result = run_experiment(spec, families={"light": fam})
    by = {m.policy: m for m in result.metrics}
    assert set(by) == set(DEFAULT_POLICIES)
    assert by["vanilla"].accuracy == 1.0 and by["optimal"].accuracy == 1.0
    assert by["optimal"].p50_ms <= by["vanilla"].p50_ms
    for m in result.metrics:
        assert m.served + m.dropped == 160
    table = comparison_table(result.metrics)
    assert "apparate" in table and "p50 vs vanilla" in table
    report = write_report(tmp_path / "rep", result.metrics, result.runs, result.info, "apparate bench compare x", 0.01)
    assert (tmp_path / "rep" / "latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "timeline.png").stat().st_size > 1000
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [m["policy"] for m in data["metrics"]] == list(DEFAULT_POLICIES)
    assert "apparate bench compare x" in report.read_text()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "apparate", *args], capture_output=True, text=True, timeout=600)


def test_record_and_replay_commands(r20_bundle, data_dir, tmp_path):
    rec = tmp_path / "rec.npz"
    out = run_cli("record", str(r20_bundle.path), "--stream", "test", "--n", "64", "--out", str(rec),
                  "--data-dir", str(data_dir), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "recorded 64 inputs" in out.stdout and rec.exists()
    assert "feature movement per site kept" in out.stdout and Recording.load(rec).move is not None
    bare = tmp_path / "bare.npz"
    out = run_cli("record", str(r20_bundle.path), "--stream", "test", "--n", "16", "--out", str(bare),
                  "--data-dir", str(data_dir), "--no-progress", "--no-move")
    assert out.returncode == 0, out.stderr
    assert Recording.load(bare).move is None and "feature movement" not in out.stdout
    rep = tmp_path / "rep"
    # a third of what the bundle's measured profile serves at batch 1: every request fits, however
    # slow the machine was when the fixture bundle was profiled (at a fixed 50/s, a loaded one shed)
    rate = f"{0.3 * 1000 / r20_bundle.profile.vanilla(1):.1f}"
    out = run_cli("replay", str(r20_bundle.path), "--recording", str(rec), "--policy", "apparate",
                  "--rate", rate, "--out", str(rep))
    assert out.returncode == 0, out.stderr
    assert "apparate" in out.stdout and (rep / "report.md").exists()
    m = json.loads((rep / "metrics.json").read_text())["metrics"][0]
    assert m["policy"] == "apparate" and m["requests"] == 64 and m["served"] == 64
    assert m["accuracy"] >= 1 - 2 / 64  # 64 inputs: at most two answers off the original's
    assert f"{m['accuracy']:.2%}" in out.stdout  # the printed table is the metrics file
    # heads that keep learning need the ramps' features: refused without them, replayed with them
    out = run_cli("replay", str(r20_bundle.path), "--recording", str(rec), "--policy", "apparate+heads", "--rate", rate)
    assert out.returncode != 0 and "--features" in out.stderr
    feat = tmp_path / "feat.npz"
    out = run_cli("record", str(r20_bundle.path), "--stream", "test", "--n", "64", "--out", str(feat),
                  "--data-dir", str(data_dir), "--no-progress", "--features")
    assert out.returncode == 0, out.stderr
    assert "ramp features kept" in out.stdout and Recording.load(feat).features is not None
    out = run_cli("replay", str(r20_bundle.path), "--recording", str(feat), "--policy", "apparate+heads",
                  "--rate", rate)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout[out.stdout.index("\n{\n") + 1:])  # the metrics, after the table
    assert got["policy"] == "apparate+heads" and got["served"] == 64


def test_replay_refuses_a_recording_from_another_bundle(r20_bundle, tmp_path, recorded):
    other = Recording(recorded.conf, recorded.pred, recorded.final, None, None, recorded.site_names,
                      {"bundle_id": "ffffffffffffffff", "bundle": "/another/bundle"})
    path = other.save(tmp_path / "other.npz")
    out = run_cli("replay", str(r20_bundle.path), "--recording", str(path))
    assert out.returncode == 2
    assert "not by" in out.stderr and "record the stream again" in out.stderr


def test_bench_evidence_prints_what_each_exit_rule_could_release(r20_bundle, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path / "cache"))
    out = run_cli("bench", "evidence", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "200", "--train", "100", "--refit", "50", "--loss", "0.01", "--no-progress")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("|") and "%" in line and "released" not in line]
    assert len(rows) == r20_bundle.num_sites
    assert "100 inputs scored out of sample" in out.stdout and "feature movement recorded" in out.stdout
    # heads that keep learning: the ramps' features are recorded (cached apart) and relearned
    out = run_cli("bench", "evidence", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "200", "--train", "100", "--refit", "50", "--loss", "0.01", "--heads",
                  "--set", "head_every=50", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "heads agree" in out.stdout and "heads release <= 1.0%" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("|") and "%" in line and "released" not in line]
    assert len(rows) == r20_bundle.num_sites and all(line.count("%") == 5 for line in rows)
    assert any(p.name.endswith("-m2f.npz") for p in (tmp_path / "cache" / "recordings").iterdir())
    out = run_cli("bench", "evidence", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "200", "--train", "400", "--no-progress")
    assert out.returncode != 0 and "the stream has 200 inputs" in out.stderr
    # a threshold that follows the stream, at the tuner's target
    out = run_cli("bench", "evidence", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "200", "--train", "100", "--refit", "50", "--loss", "0.01", "--causal",
                  "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "causal at the tuner's target" in out.stdout and "learned: worst 500" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("|") and "%" in line and "released" not in line]
    assert len(rows) == r20_bundle.num_sites and all(line.count("%") == 7 for line in rows)
    costs = [float(line.strip("| ").split("|")[2]) for line in rows]  # the exit cost column
    alone = [float(line.strip("| ").split("|")[-1]) for line in rows]  # the median with this ramp alone
    # an input costs its site's exit or a whole pass: the median lies between (printed to 2 decimals)
    assert all(c - 0.006 <= a <= 1.0 for c, a in zip(costs, alone))
    # scoring from input 20 on (fits on at most --train before), and per-block hindsight
    out = run_cli("bench", "evidence", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "200", "--train", "100", "--refit", "50", "--start", "20",
                  "--blocks", "60", "--loss", "0.01", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "180 inputs scored out of sample from input 20" in out.stdout and "per block of 60" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("|") and "%" in line and "released" not in line]
    assert len(rows) == r20_bundle.num_sites and all(line.count("%") == 5 for line in rows)


def test_per_block_hindsight_shares():
    from apparate.bench.evidence import by_blocks
    from apparate.core.evidence import release_share

    rng = np.random.default_rng(0)
    score, ok = rng.random(300), rng.random(300) < 0.9
    assert by_blocks(score, ok, 0.02, 300) == release_share(score, ok, 0.02)  # one block: the plain share
    # two blocks, each releasing its own share of its half
    assert by_blocks(score, ok, 0.02, 150) == pytest.approx(
        (release_share(score[:150], ok[:150], 0.02) + release_share(score[150:], ok[150:], 0.02)) / 2)
    # a block of only agreeing inputs releases all of it, whatever the other block does
    ok2 = ok.copy()
    ok2[:100] = True
    assert by_blocks(score, ok2, 0.0, 100) >= 1 / 3


@hsettings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(20, 400), st.integers(1, 40), st.floats(0.0, 0.05))
def test_a_causal_threshold_uses_only_answers_already_known(seed, n, every, loss):
    from apparate.bench.evidence import causal_release

    rng = np.random.default_rng(seed)
    score = rng.random(n)
    score[rng.random(n) < 0.1] = np.nan  # not scored yet: never released
    ok = rng.random(n) < 0.8
    got = causal_release(score, ok, lambda m: loss, every=every, window=128)
    assert not (got & np.isnan(score)).any()
    assert not got[:every].any()  # nothing known before the first block
    # the answers of a block and after it do not change what was released before it
    cut = every * int(rng.integers(1, max(n // every, 1) + 1))
    flipped = ok.copy()
    flipped[cut:] = ~flipped[cut:]
    assert np.array_equal(causal_release(score, flipped, lambda m: loss, every=every, window=128)[:cut], got[:cut])
    # a stream where every answer agrees: the threshold falls to the lowest score it was tuned on
    every_ok = causal_release(score, np.ones(n, dtype=bool), lambda m: loss, every=every, window=128)
    for a in range(0, n, every):
        past = np.flatnonzero(~np.isnan(score[:a]))[-128:]
        blk = score[a:a + every]
        want = ~np.isnan(blk) & (blk >= score[past].min()) if past.size else np.zeros(blk.size, dtype=bool)
        assert np.array_equal(every_ok[a:a + every], want)


def test_recorded_features_and_heads_give_back_the_ramps_answers(r20_bundle, r20, tmp_path):
    """Heads that keep learning retrain a ramp's linear head on what it reads: recorded features
    x recorded heads must reproduce the ramps' own answers (real forward passes), and survive a
    save/load and a slice."""
    from apparate.core.heads import head_scores

    rec = record_stream(dataclasses.replace(r20_bundle, workload=r20), r20.stream("test", n=48), batch_size=16,
                        progress=False, features=True)
    assert rec.features is not None and len(rec.features) == rec.num_sites
    for s, (x, (w, b)) in enumerate(zip(rec.features, rec.heads)):
        conf, pred = head_scores(x.astype(np.float32), w, b)
        assert (pred == rec.pred[:, s]).mean() >= 0.95, s  # float16 features: a near tie may flip
        assert np.allclose(conf, rec.conf[:, s], atol=2e-2), s
    back = Recording.load(rec.save(tmp_path / "f.npz"))
    assert all(np.array_equal(a, b) for a, b in zip(back.features, rec.features))
    assert np.array_equal(back.take(slice(5, 9)).features[2], rec.features[2][5:9])
    with pytest.raises(ValueError, match="come together"):
        Recording(rec.conf, rec.pred, rec.final, features=rec.features)


def test_bench_capacity_finds_each_policys_highest_rate_within_the_slo(r20_bundle, data_dir, tmp_path, monkeypatch):
    """Real replays of a real recording at rising rates: vanilla's capacity is found between a
    passing and a failing rate, apparate's is at most a little above it (it never saves compute),
    apparate-stop's is reported with the share of its inputs that ran to the end, and
    capacity.json holds what the table says."""
    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "cap"
    start = 0.2 * 1000 / r20_bundle.profile.vanilla(1)  # well within what the fixture bundle measured
    out = run_cli("bench", "capacity", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "160", "--trace", "poisson", "--rate", f"{start:.1f}", "--steps", "3",
                  "--refine", "2", "--out", str(out_dir), "--no-progress")
    assert out.returncode == 0, out.stderr
    got = json.loads((out_dir / "capacity.json").read_text())
    caps = {d["policy"]: d for d in got["capacity"]}
    assert set(caps) == {"vanilla", "apparate", "apparate-stop"} and (out_dir / "goodput.png").stat().st_size > 0
    van = caps["vanilla"]["capacity_rps"]
    assert van is not None and van >= round(start, 1)
    rates = {r["offered"]: r for r in got["rates"]["vanilla"]}
    assert any(r > van for r in rates)  # a failing rate above it was tried
    assert caps["apparate"]["capacity_rps"] is None or 0.5 * van <= caps["apparate"]["capacity_rps"] <= 1.5 * van
    assert f"{van:.2f}" in out.stdout
    assert caps["vanilla"]["completed"] == 1.0
    stop = caps["apparate-stop"]
    assert stop["capacity_rps"] is None or 0 < stop["completed"] <= 1.0


def test_bench_capacity_over_draws_of_the_arrivals(r20_bundle, data_dir, tmp_path, monkeypatch):
    """`--draws 2`: the search runs again on another draw of the arrivals; each policy's capacity
    per draw and its median are reported, and the first draw is the plain run's."""
    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path / "cache"))
    start = 0.2 * 1000 / r20_bundle.profile.vanilla(1)
    common = ["bench", "capacity", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
              "--stream", "test", "--n", "120", "--trace", "poisson", "--rate", f"{start:.1f}", "--steps", "3",
              "--refine", "2", "--policies", "vanilla,apparate", "--no-progress"]
    out = run_cli(*common, "--draws", "2", "--out", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "two" / "capacity.json").read_text())
    for d in got["capacity"]:
        assert len(d["draws"]["capacity_rps"]) == 2 and len(d["draws"]["vanilla_rps"]) == 2
        assert d["draws"]["capacity_rps"][0] == d["capacity_rps"]  # the first draw is the table's
    van = next(d for d in got["capacity"] if d["policy"] == "vanilla")["draws"]
    assert van["capacity_rps"] == van["vanilla_rps"]
    assert "Over 2 draws of the arrivals" in out.stdout and "Over 2 draws" in (tmp_path / "two" / "capacity.md").read_text()
    bad = run_cli(*common, "--draws", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--draws" in bad.stderr


@pytest.mark.parametrize("hook", ["plain", "learned"])
def test_served_ramp_costs_replace_only_the_ramps_costs(r20_bundle, r20, hook):
    """`--ramp-costs served`: the bundle's profile with each ramp's cost as a server calibrates it
    through its own executor (the learned rule's hook for `apparate-learned`); the backbone's
    times are the bundle's, every ramp has a measured cost, at batch 1 and the max batch."""
    from apparate.bench.served_costs import hook_of, served_ramp_costs
    from apparate.core.settings import Settings

    assert hook_of("apparate-learned") == "learned" and hook_of("apparate") == "plain"
    before = r20_bundle.profile
    after = served_ramp_costs(dataclasses.replace(r20_bundle, workload=r20), hook, 4, Settings())
    for b in (1, 4):
        assert np.array_equal(after.at(b)[0], before.at(b)[0]) and after.vanilla(b) == before.vanilla(b)
        assert after.at(b)[1].shape == before.at(b)[1].shape and (after.at(b)[1] > 0).all()
        assert not np.array_equal(after.at(b)[1], before.at(b)[1])  # measured here, not the bundle's
    with pytest.raises(ValueError, match="hook"):
        served_ramp_costs(r20_bundle, "heads", 4, Settings())


@pytest.mark.parametrize("costs", [{"ramp_costs": "served"}, {"profile": "here"}])
def test_served_ramp_costs_need_a_bundle(recorded, r20_bundle, costs):
    fam = RampFamily(r20_bundle.recording, recorded, r20_bundle.profile)
    spec = ExperimentSpec(workload="r20", kind="image", progress=False, policies=("vanilla", "apparate"), **costs)
    with pytest.raises(ValueError, match="bundle"):
        run_experiment(spec, families={"light": fam})


def test_profile_here_retimes_the_backbone_and_every_ramp(r20_bundle, r20):
    """`--profile here`: the bundle's backbone timed again through a server's executor at every
    profiled batch size (its sites keep their shares of the pass), and every ramp as a server
    calibrates it."""
    from apparate.bench.served_costs import profile_here

    before = r20_bundle.profile
    lines: list[str] = []
    after = profile_here(dataclasses.replace(r20_bundle, workload=r20), 4, log=lines.append)
    for b in (int(x) for x in before.batch_sizes):
        assert after.vanilla(b) != before.vanilla(b)  # measured now, not the bundle's
        assert np.allclose(after.at(b)[0] / after.vanilla(b), before.at(b)[0] / before.vanilla(b))
        assert (after.at(b)[1] > 0).all() and not np.array_equal(after.at(b)[1], before.at(b)[1])
    assert lines and "re-timed here" in lines[0]
    # timed once per process: `bench capacity` and `bench spread` replay many times on one profile
    assert profile_here(dataclasses.replace(r20_bundle, workload=r20), 4) is after


def test_bench_compare_on_the_profile_re_timed_here(r20_bundle, data_dir, tmp_path, monkeypatch):
    """Every policy, vanilla included, replays on the re-timed profile: at a rate where nothing
    queues, vanilla's median is the re-timed batch-1 pass, not the bundle's."""
    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path / "cache"))
    out = run_cli("bench", "compare", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
                  "--stream", "test", "--n", "60", "--trace", "fixed", "--rate", "1", "--policies", "vanilla,apparate",
                  "--profile", "here", "--out", str(tmp_path / "rep"), "--no-progress", "--threads", "1")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert data["info"]["profile"] == "here"
    retimed = float(out.stdout.split("a batch-1 pass ")[1].split(" ms")[0])
    van = next(m for m in data["metrics"] if m["policy"] == "vanilla")
    assert van["p50_ms"] == pytest.approx(retimed, abs=0.01)
    assert data["info"]["vanilla_ms_batch1"] == pytest.approx(retimed, abs=0.01)


def test_bench_capacity_within_checks_needs_the_accuracy_too(r20_bundle, data_dir, tmp_path, monkeypatch):
    """`--within-checks`: a rate passes only if the policy also keeps its accuracy over the stream
    and in every window at the floor. `branchynet+opt` is tuned in hindsight to spend the whole
    (here 20%) constraint, so it answers some inputs wrongly at every rate: in time it has a
    capacity, but with a floor of 100% for every window it has none. Vanilla, never wrong, keeps
    one. Bad flags fail before any replay."""
    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path / "cache"))
    start = 0.2 * 1000 / r20_bundle.profile.vanilla(1)
    common = ["bench", "capacity", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir", str(data_dir),
              "--stream", "test", "--n", "160", "--trace", "poisson", "--rate", f"{start:.1f}", "--steps", "3",
              "--refine", "2", "--policies", "vanilla,branchynet+opt", "--accuracy-constraint", "0.2", "--no-progress"]
    plain = run_cli(*common, "--out", str(tmp_path / "plain"))
    strict = run_cli(*common, "--within-checks", "--min-worst-window", "1.0", "--out", str(tmp_path / "strict"))
    assert plain.returncode == 0 and strict.returncode == 0, plain.stderr + strict.stderr
    got = {k: json.loads((tmp_path / k / "capacity.json").read_text()) for k in ("plain", "strict")}
    assert got["plain"]["checks"] is None and got["strict"]["checks"] == {"min_accuracy": 0.8, "min_worst_window": 1.0}
    caps = {k: {d["policy"]: d for d in g["capacity"]} for k, g in got.items()}
    opt = caps["plain"]["branchynet+opt"]
    assert opt["capacity_rps"] is not None and opt["worst_window_accuracy"] < 1.0  # in time, though wrong at times
    assert caps["strict"]["branchynet+opt"]["capacity_rps"] is None
    tried = got["strict"]["rates"]["branchynet+opt"]  # every rate tried says why it failed
    assert tried and all(not r["passes"] and r["worst_window_accuracy"] < 1.0 for r in tried)
    assert any(r["passes"] for r in got["plain"]["rates"]["branchynet+opt"])
    van = caps["strict"]["vanilla"]
    assert van["capacity_rps"] is not None and van["accuracy"] == 1.0 and van["worst_window_accuracy"] == 1.0
    assert "every window >= 100.00%" in strict.stdout
    bad = run_cli(*common, "--min-worst-window", "0.9", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--within-checks" in bad.stderr
