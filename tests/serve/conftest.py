"""Fixtures for the serving tests: small real models, real bundles, real servers on loopback.

* `tiny_cnn`: a 3-class CNN on 8x8 images with two sites (`b1`, `b2`) and a module between them
  that can be made slow on purpose (`model.slow.delay = 0.3`), so that an answer released at the
  first ramp can be seen arriving long before its batch ends.
* `tiny_text`: a 2-class bag-of-embeddings text model with two sites, a whitespace tokenizer.
Both are prepared through `apparate.model.prepare.prepare_model` on a few dozen inputs (ramps
trained, latency profiled, bundle written and loaded back), once per session.

`serving(...)` runs an engine behind a real uvicorn server on a free loopback port.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch import nn

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def find_data_dir() -> "os.PathLike":
    env = os.environ.get("APPARATE_DATA")
    path = __import__("pathlib").Path(env) if env else REPO.parent / "shared" / "data"
    assert path.is_dir(), f"test data not found at {path}: set APPARATE_DATA or provide ../shared/data"
    return path


class Sleep(nn.Module):
    """Identity that sleeps `delay` seconds (waiting, as for a lock or a device) or computes for
    `spin` seconds (a busy loop: as a slower machine would): a model made slow on purpose after
    a site."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0
        self.spin = 0.0
        self.hold: Any = None  # a threading.Event the next forward waits for (once), then cleared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.wait(60)
        if self.delay:
            time.sleep(self.delay)
        if self.spin:
            end = time.thread_time() + self.spin
            while time.thread_time() < end:
                pass
        return x


class Boom(nn.Module):
    """Identity that raises while `armed`: a backbone failure on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("backbone failure on purpose")
        return x


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.slow = Sleep()
        self.boom = Boom()
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.boom(self.slow(self.b1(self.stem(x))))))


def encode_images(imgs: Any) -> torch.Tensor:
    return torch.stack(list(imgs)).float() / 255.0


class TinyText(nn.Module):
    VOCAB = 64

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, 16)
        self.l1 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.l2 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l2(self.l1(self.emb(input_ids)))
        m = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        return self.head((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1))


class WordTokens:
    """Whitespace tokens hashed into the vocabulary, [CLS] = 1 first, padding 0."""

    def __init__(self, max_tokens: int = 16) -> None:
        self.max_tokens = max_tokens

    def ids(self, text: str) -> list[int]:
        return [1] + [2 + sum(map(ord, w)) % (TinyText.VOCAB - 2) for w in text.split()]

    def count(self, texts: list[str]) -> list[int]:
        return [len(self.ids(t)) for t in texts]

    def __call__(self, texts: Any, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        rows = [self.ids(t)[: (pad_to or self.max_tokens)] for t in texts]
        width = pad_to or max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


WORDS = "good bad great awful fine dull witty boring sharp flat warm cold bright dark".split()


@dataclass
class Prepared:
    model: nn.Module  # pristine: never wrapped, deep-copied for every server
    bundle: Any


def _opts() -> Any:
    from apparate.model.prepare import PrepareOptions

    return PrepareOptions(max_batch=8, warmup=1, repeats=2, progress=False, epochs=8, holdout=0.5, seed=0, threads=1)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy 2-core machine OpenMP threads
    that spin-wait for each other make them 100x slower: one thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    from apparate.model.bundle import load_bundle
    from apparate.model.prepare import prepare_model
    from apparate.zoo.workload import Stream

    torch.manual_seed(0)
    model = TinyCNN().eval()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("bundles") / "tiny-cnn"
    prepare_model(model, encode_images, Stream("rand", imgs, np.full(64, -1), np.ones(64)), out, num_classes=3,
                  site_names=["b1", "b2"], options=_opts(), log=lambda s: None)
    return Prepared(model, load_bundle(out, model=model))


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    from apparate.model.bundle import load_bundle
    from apparate.model.prepare import prepare_model
    from apparate.zoo.workload import Stream

    torch.manual_seed(0)
    model = TinyText().eval()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 10))) for _ in range(64)]
    tok = WordTokens()
    out = tmp_path_factory.mktemp("bundles") / "tiny-text"
    prepare_model(model, tok, Stream("rand", texts, np.full(64, -1), tok.count(texts)), out, num_classes=2,
                  ramp="cls", site_names=["l1", "l2"], profile_lengths=(4, 8, 16), options=_opts(), log=lambda s: None)
    return Prepared(model, load_bundle(out, model=model))


def served_cnn(prep: Prepared, name: str = "tiny", **kw: Any) -> Any:
    """A ServedModel over a fresh copy of the tiny CNN (so each server has its own hooks)."""
    from apparate.serve.model_io import ImageCodec, ServedModel

    model = copy.deepcopy(prep.model)
    b = prep.bundle
    return ServedModel(name, b.early_exit_model(model=model), ImageCodec(encode_images, (8, 8, 3), **kw), b.profile,
                       num_classes=3, class_names=("red", "green", "blue"), recording=b.recording,
                       fingerprint=b.manifest["model"]["fingerprint"])


def served_text(prep: Prepared, name: str = "words", long_text: str = "truncate") -> Any:
    from apparate.serve.model_io import ServedModel, TextCodec

    model = copy.deepcopy(prep.model)
    b = prep.bundle
    tok = WordTokens(max_tokens=16)
    codec = TextCodec(count=tok.count, encode_fn=tok, max_tokens=16, long_text=long_text, max_chars=500)
    return ServedModel(name, b.early_exit_model(model=model), codec, b.profile, num_classes=2,
                       class_names=("negative", "positive"), recording=b.recording,
                       fingerprint=b.manifest["model"]["fingerprint"])


@dataclass
class Live:
    url: str
    engine: Any
    served: Any

    def model_url(self, suffix: str = "") -> str:
        return f"{self.url}/v2/models/{self.served.name}{suffix}"


@contextlib.contextmanager
def serving(served: Any, engine_opts: Any = None, control_opts: Any = None, max_body_bytes: int = 1 << 20,
            graceful_timeout_s: float = 30.0, load: Any = None) -> Iterator[Live]:
    """`load`: a function bundle path -> ServedModel; given, Triton's load verb is on."""
    from apparate.serve.app import create_app
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.server import ServerThread

    engine = Engine(served, engine_opts or EngineOptions(slo_ms=2000, threads=1), control_opts or ControlOptions())
    from apparate.serve.repository import Repository

    repo = None if load is None else Repository(engine, load)
    srv = ServerThread(create_app(engine, max_body_bytes, repository=repo), graceful_timeout_s=graceful_timeout_s).start()
    try:
        yield Live(srv.url, engine, served)
    finally:
        srv.stop()
        engine.executor.close()
        served.ee.remove_hooks()


def image_request(n: int = 1, seed: int = 0, dtype: str = "UINT8") -> dict[str, Any]:
    data = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3))
    values = data.reshape(-1).tolist() if dtype == "UINT8" else data.astype(float).reshape(-1).tolist()
    return {"inputs": [{"name": "input", "shape": [n, 8, 8, 3], "datatype": dtype, "data": values}]}


def text_request(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def wait_for(cond: Any, timeout: float = 10.0, every: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())
