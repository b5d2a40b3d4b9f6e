import json

import numpy as np
from PIL import Image

from apparate.cli import main


def test_list(capsys):
    assert main(["prepare", "--list"]) == 0
    out = capsys.readouterr().out.split()
    assert {"cifar10-resnet56", "cifar10-vehicle-resnet56", "minilm-sst2", "minilm-rt", "effnet-lite0"} <= set(out)


def test_errors_are_one_line(capsys, tmp_path):
    assert main(["prepare", "cifar10-resnet99", "--out", str(tmp_path / "x")]) == 2
    assert "unknown workload" in capsys.readouterr().err
    assert main(["prepare", "images", "--out", str(tmp_path / "x")]) == 2
    assert "--model" in capsys.readouterr().err


def test_prepare_own_image_model(capsys, tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "bundle"
    rc = main(["prepare", "images", "--model", "apparate.zoo.cifar_resnet:CifarResNet", "--images",
               str(tmp_path / "imgs"), "--classes", "10", "--out", str(out), "--epochs", "2", "--max-batch", "2",
               "--repeats", "1", "--threads", "1", "--sites", "layer1.2,layer3.2,layer2.2", "--no-progress",
               "--ramp", "conv"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "per-site agreement" in text and "layer2.2" in text
    m = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in m["sites"]] == ["layer1.2", "layer2.2", "layer3.2"]
    assert m["ramps"][0]["kind"] == "conv" and m["options"]["threads"] == 1
