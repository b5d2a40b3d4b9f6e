"""A user's own logs through the commands: `record --stream csv:|images:` and `replay` /
`bench compare` with `--trace file:|azure-functions:`, on real models and real files; a
malformed row fails at once, naming its line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apparate.core.recording import Recording

SENTENCES = ["a gorgeous , witty , seductive movie .", "one long string of cliches .", "an utterly charming film",
             "dull , lifeless and far too long", "a masterpiece of quiet beauty", "the plot makes no sense at all",
             "funny , touching and smart", "i wanted my two hours back", "a triumph", "tedious",
             "warm and generous", "a mess from start to finish", "beautifully shot and well acted", "boring",
             "an instant classic", "painfully unfunny"]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """`apparate ...` in this process (the commands' own entry point; no interpreter start-up),
    with its cache in a temporary folder."""
    from apparate.cli import main

    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()

    def run(*args: str) -> Ran:
        capsys.readouterr()
        try:
            code = main(list(args))
        finally:
            torch.set_num_threads(threads)  # --threads sets the process's
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)
    return run


@pytest.fixture(scope="module")
def hf_bundle(tmp_path_factory) -> Path:
    """A user's own HF classifier directory (MiniLM with a seeded head), prepared on a few texts."""
    from apparate.model.prepare import PrepareOptions, prepare_workload
    from apparate.zoo import minilm
    from apparate.zoo.byo import hf_text_workload

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    hf = minilm.load_hf_classifier(minilm.base_model_dir(), num_labels=2)
    hf.save_pretrained(root / "model", safe_serialization=True)
    minilm.load_tokenizer(minilm.base_model_dir()).save_pretrained(root / "model")
    boot = root / "boot.csv"
    boot.write_text("text\n" + "".join(f'"{s}"\n' for s in SENTENCES))
    opts = PrepareOptions(epochs=2, max_batch=2, warmup=0, repeats=1, progress=False, holdout=0.25, seed=0, threads=1)
    prepare_workload(hf_text_workload(root / "model", boot), root / "bundle", opts, log=lambda s: None)
    return root / "bundle"


def test_own_texts_and_arrival_log_replayed_in_two_commands(hf_bundle, tmp_path, run_cli):
    texts = tmp_path / "my_requests.csv"
    texts.write_text("text,label\n" + "".join(f'"{s}",{"positive" if i % 2 == 0 else 0}\n'
                                              for i, s in enumerate(SENTENCES)))
    arrivals = tmp_path / "arrivals.csv"  # a server log's request times: date-times, as read_csv reads
    arrivals.write_text("timestamp\n" + "".join(f"2026-01-05 10:00:{s:09.6f}\n" for s in (0, 0.2, 0.25, 1.0, 1.1)))
    rec = tmp_path / "mine.npz"
    out = run_cli("record", str(hf_bundle), "--stream", f"csv:{texts}", "--out", str(rec), "--threads", "1",
                  "--no-progress")
    assert out.returncode == 0, out.stderr
    assert f"recorded {len(SENTENCES)} inputs" in out.stdout
    r = Recording.load(rec)
    assert r.labels.tolist() == [1 - i % 2 for i in range(len(SENTENCES))]
    out = run_cli("replay", str(hf_bundle), "--recording", str(rec), "--trace", f"file:{arrivals}", "--out",
                  str(tmp_path / "rep"))
    assert out.returncode == 0, out.stderr
    # 5 arrivals for 16 inputs: played 4 times over, and said so
    assert "its own rate 3.636/s, repeated 4 times (5 arrivals over 1.1 s) to cover 16 inputs" in out.stdout
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["metrics"][0]["requests"] == len(SENTENCES) and m["metrics"][0]["served"] == len(SENTENCES)
    assert not np.isnan(m["metrics"][0]["label_accuracy"])


def test_malformed_rows_fail_before_any_model_work_naming_the_line(hf_bundle, tmp_path, run_cli):
    texts = tmp_path / "t.csv"
    texts.write_text('text,label\n"fine",1\n"too, many",1,2\n')
    out = run_cli("record", str(hf_bundle), "--stream", f"csv:{texts}", "--out", str(tmp_path / "r.npz"))
    assert out.returncode == 2 and "t.csv, line 3: 3 cells, the header has 2" in out.stderr
    arrivals = tmp_path / "a.csv"
    arrivals.write_text("arrival_s\n0\nsoon\n")
    out = run_cli("replay", str(hf_bundle), "--recording", str(tmp_path / "none.npz"), "--trace", f"file:{arrivals}")
    assert out.returncode == 2
    out = run_cli("bench", "compare", "cifar10-resnet20", "--stream", "images:/nonexistent/shots")
    assert out.returncode == 2 and "no image folder or manifest at /nonexistent/shots" in out.stderr
    out = run_cli("bench", "compare", "cifar10-resnet20", "--trace", f"file:{arrivals}")
    assert out.returncode == 2 and "a.csv, line 3: 'soon' is not a time in seconds" in out.stderr


def test_own_images_with_an_azure_functions_trace_in_bench_compare(r20_bundle, r20, data_dir, tmp_path, run_cli):
    shots = tmp_path / "shots"
    stream = r20.stream("test", n=40)
    for i in range(len(stream)):
        folder = shots / r20.class_names[int(stream.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(stream.inputs[i])).save(folder / f"{i:03d}.png")
    inv = tmp_path / "invocations.csv"
    inv.write_text("HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f0,http,500,0,700\no,a,f1,timer,1,1,1\n")
    out = run_cli("bench", "compare", "cifar10-resnet20", "--bundle", str(r20_bundle.path), "--data-dir",
                  str(data_dir), "--stream", f"images:{shots}", "--trace", f"azure-functions:{inv}:f0",
                  "--rate", "5", "--slo-ms", "60000", "--policies", "vanilla,apparate,optimal", "--out", str(tmp_path / "rep"),
                  "--no-progress", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "rescaled from" in out.stdout and "cut to its first 40 of 1200 arrivals" in out.stdout
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    by = {m["policy"]: m for m in data["metrics"]}
    assert by["vanilla"]["served"] == 40 and by["vanilla"]["accuracy"] == 1.0
    # a minute-long SLO: nothing is dropped however fast this machine measured the model
    # the folders named the model's own classes, so ground truth is known for every image
    assert by["vanilla"]["label_accuracy"] > 0.5
    assert data["info"]["stream"] == f"images:{shots}"
