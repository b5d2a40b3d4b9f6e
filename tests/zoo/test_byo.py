import numpy as np
import pytest
import torch
from PIL import Image

from apparate.zoo.byo import hf_text_workload, image_stream, image_workload
from apparate.zoo.cifar_resnet import CifarResNet


def _images(root, n=3):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_and_manifest(tmp_path):
    _images(tmp_path / "imgs")
    s, classes = image_stream(tmp_path / "imgs")
    assert classes == ("cat", "dog") and len(s) == 6 and list(s.labels) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "m.csv").write_text("path,label\nimgs/dog/0.png,1\nimgs/cat/1.png,\n")
    m, _ = image_stream(tmp_path / "m.csv")
    assert list(m.labels) == [1, -1]
    (tmp_path / "bad.csv").write_text("path\nimgs/none.png\n")
    with pytest.raises(FileNotFoundError):
        image_stream(tmp_path / "bad.csv")


def test_image_workload_prepares_any_module(tmp_path):
    from apparate.zoo import load_bundle
    from apparate.model.prepare import PrepareOptions, prepare_workload

    _images(tmp_path / "imgs", n=8)
    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    w = image_workload(model, tmp_path / "imgs", num_classes=10)
    opts = PrepareOptions(epochs=2, max_batch=2, warmup=0, repeats=1, progress=False, holdout=0.25)
    b = prepare_workload(w, tmp_path / "b", opts, log=lambda s: None)
    assert b.num_sites == 9
    with pytest.raises(ValueError, match="pass it as load_bundle"):
        load_bundle(tmp_path / "b")
    assert load_bundle(tmp_path / "b", model=model).num_sites == 9


def test_hf_model_directory_with_texts(tmp_path):
    from apparate.zoo.minilm import base_model_dir

    (tmp_path / "t.tsv").write_text("label\tsentence\n1\ta fine film\n0\tawful\n")
    w = hf_text_workload(base_model_dir(), tmp_path / "t.tsv")
    s = w.stream("texts")
    assert list(s.labels) == [1, 0] and s.costs[0] > s.costs[1]
    assert w.source["kind"] == "hf" and w.num_classes == 2
