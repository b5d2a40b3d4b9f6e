import subprocess
import sys

from apparate import __version__
from apparate.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "apparate", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("version", "bench"):
        assert cmd in out.stdout


def test_version(capsys):
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_bench_tuning_runs_and_reports_same_decisions():
    out = run_cli("bench", "tuning", "--repeats", "1", "--seeds", "2")
    assert out.returncode == 0, out.stderr
    section = out.stdout.split("## Greedy search")[1].split("##")[0]
    rows = [line for line in section.splitlines() if "(3, 64)" in line or "(8, 256)" in line]
    assert len(rows) == 2
    # the fast search takes exactly the artifact-style search's decisions
    assert all(line.rstrip(" |").endswith("yes") for line in rows[:2]), rows


def test_unknown_command_fails():
    out = run_cli("no-such-command")
    assert out.returncode != 0


def test_settings_overrides_reach_the_experiment_and_bad_ones_are_refused():
    import argparse

    import pytest

    from apparate.bench.experiment_args import add_experiment_args, parse_overrides, spec_from_args
    from apparate.core.settings import Settings

    assert parse_overrides(["agreement=raw", "placement=spaced", "max_ramps=null", "tune_gap=0.1"]) == {
        "agreement": "raw", "placement": "spaced", "max_ramps": None, "tune_gap": 0.1}
    p = argparse.ArgumentParser()
    add_experiment_args(p, workload_default="minilm-rt")
    spec = spec_from_args(p.parse_args(["--set", "agreement=raw", "--set", "window_inputs=512",
                                        "--ramp-budget", "0.05"]))
    for kind in ("image", "text"):
        s = spec.settings_for(kind)
        assert (s.agreement, s.window_inputs, s.ramp_budget) == ("raw", 512, 0.05)
        assert s == Settings.for_kind(kind, agreement="raw", window_inputs=512, ramp_budget=0.05)
    with pytest.raises(ValueError, match="unknown settings"):
        spec_from_args(p.parse_args(["--set", "no_such=1"]))
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_overrides(["agreement"])
    out = run_cli("demo", "--set", "no_such=1", "--policies", "vanilla")
    assert out.returncode != 0 and "unknown settings" in out.stderr
