import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apparate.model.sites import UntraceableModelError, cut_vertices, find_sites, trace
from apparate.zoo.cifar_resnet import CifarResNet


def test_resnet20_has_one_site_per_block(r20):
    sites = find_sites(r20.model, torch.zeros(1, 3, 32, 32))
    assert [s.name for s in sites] == [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert [s.index for s in sites] == list(range(9))
    assert sites[0].shape == (16, 32, 32) and sites[-1].shape == (64, 8, 8)


def test_resnet56_has_27_sites():
    sites = find_sites(CifarResNet(56).eval(), torch.zeros(1, 3, 32, 32))
    assert len(sites) == 27
    assert sites[9].name == "layer2.0" and sites[9].shape == (32, 16, 16)


def test_minilm_has_one_site_per_encoder_layer(minilm_base):
    model, enc = minilm_base
    sites = find_sites(model, enc(["a fine film", "awful"]))
    assert [s.name for s in sites] == [f"hf.bert.encoder.layer.{i}" for i in range(6)]
    assert sites[0].shape[-1] == 384


def test_effnet_lite0_has_one_site_per_mbconv_block():
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_name("efficientnet-lite0")
    m.set_swish(memory_efficient=False)
    sites = find_sites(m.eval(), torch.zeros(1, 3, 224, 224))
    assert [s.name for s in sites] == [f"_blocks.{i}" for i in range(16)]


class Diamond(nn.Module):
    """x -> a -> (b | c) -> add -> d: a and the add are on every path, b and c are not."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        h = self.a(x)
        return self.d(self.b(h) + self.c(h))


def test_cut_vertices_of_a_diamond():
    graph, _ = trace(Diamond())
    cuts = {n.name for n in cut_vertices(graph)}
    assert {"a", "add", "d"} <= cuts
    assert "b" not in cuts and "c" not in cuts


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace this
            h = self.block(h)
        return self.head(h)


def test_untraceable_model_error_names_construct_and_way_out():
    with pytest.raises(UntraceableModelError) as e:
        find_sites(Untraceable(), torch.ones(2, 4))
    msg = str(e.value)
    assert "if h.sum() > 0" in msg  # the construct, quoted from the source
    assert "names=" in msg and "--sites" in msg  # how to name sites by hand


def test_manual_site_names_work_and_follow_execution_order():
    model = Untraceable().eval()
    with torch.no_grad():
        model.stem[0].bias.fill_(1.0)  # make sure the branch runs
    sites = find_sites(model, torch.ones(2, 4), names=["block", "stem"])
    assert [s.name for s in sites] == ["stem", "block"]
    assert sites[1].shape == (8,)


def test_manual_site_names_are_checked():
    with pytest.raises(ValueError, match="no module named"):
        find_sites(Untraceable(), torch.ones(2, 4), names=["nope"])


def test_shape_queries_do_not_hide_cut_vertices():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
            self.b2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            bs = x.size(0)  # a shape edge from the input to the end must not count as a path
            h = self.b2(self.b1(x))
            return self.fc(F.adaptive_avg_pool2d(h, 1).view(bs, -1))

    assert [s.name for s in find_sites(Flat().eval(), torch.zeros(1, 3, 8, 8))] == ["b1", "b2"]
