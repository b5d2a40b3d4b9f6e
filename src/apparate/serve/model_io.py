"""The served model and its input codecs: Open Inference Protocol tensors in, model batches out.

A codec validates one request's input tensor (every error is a clear 400 for that request
alone, before anything reaches the engine), turns it into per-input items with a cost key, and
encodes a batch of items into what the model takes.

Images: `UINT8` or `FP32` tensors of shape [N, H, W, C] (or [H, W, C] for one image), pixel
values 0..255 in both cases, channels last (the layout of decoded image files), as JSON numbers
or as raw little-endian bytes (the binary tensor extension, see protocol.py). Text: `BYTES`
tensors of shape [N] (or [N, 1]) of UTF-8 strings; empty strings are refused, and texts longer
than `max_tokens` tokens are cut (`long_text="truncate"`, the default) or refused ("reject").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from apparate.devices import to_device


class InputError(ValueError):
    """A request's input is unusable: HTTP 400 with this message."""


def _as_int_shape(shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InputError(f"input 'shape' must be a list of integers, got {shape!r}")
    if any(s < 0 for s in shape):
        raise InputError(f"input 'shape' must not be negative, got {shape}")
    return shape


def _flat(data: Any, what: str) -> np.ndarray:
    if isinstance(data, np.ndarray):  # decoded piecewise by protocol.decode_json: a flat list already
        return data.reshape(-1)
    if not isinstance(data, list):
        raise InputError(f"input 'data' must be a list, got {type(data).__name__}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InputError(f"input 'data' is ragged or mixes types; send a flat list of {what}") from None
    return arr.reshape(-1)


BINARY = "__binary__"  # where protocol.parse_infer puts a tensor's binary data (binary tensor extension)


def _binary_strings(raw: bytes) -> list[str]:
    """BYTES in the binary tensor extension: each element a 4-byte little-endian length, then
    that many bytes (UTF-8 here)."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InputError("binary BYTES data is cut short (a 4-byte length prefix is incomplete)")
        k = int.from_bytes(raw[i:i + 4], "little")
        if i + 4 + k > len(raw):
            raise InputError("binary BYTES data is cut short (an element is shorter than its length prefix)")
        try:
            out.append(raw[i + 4:i + 4 + k].decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"binary BYTES element {len(out)} is not UTF-8") from None
        i += 4 + k
    return out


# ---------------------------------------------------------------------------------------------- images

@dataclass
class ImageCodec:
    """[N, H, W, C] pixel tensors -> per input an [H, W, C] numpy array (parse, on the event loop)
    -> a batch as a list of [C, H, W] tensors (encode, on the engine thread) -> the workload's
    encoder. Items may also be [C, H, W] tensors (in-process callers)."""

    encode_fn: Callable[[Sequence[Any]], Any]  # list of [C, H, W] uint8 (or float 0..255) tensors
    shape: tuple[int, int, int]  # (H, W, C)
    max_inputs: int = 64
    kind: str = "image"
    input_name: str = "input"
    device: Any = None  # torch.device the batch goes to (None: stays on the host); pinned toward CUDA

    def metadata_inputs(self) -> list[dict[str, Any]]:
        h, w, c = self.shape
        return [{"name": self.input_name, "datatype": "UINT8", "shape": [-1, h, w, c],
                 "parameters": {"also_accepts": "FP32", "layout": "NHWC", "range": "0..255"}}]

    def parse(self, tensor: dict[str, Any]) -> tuple[list[Any], list[int]]:
        dtype = tensor.get("datatype")
        if dtype not in ("UINT8", "FP32"):
            raise InputError(f"input '{self.input_name}' must have datatype UINT8 or FP32 (pixels 0..255), got {dtype!r}")
        shape = _as_int_shape(tensor.get("shape"))
        if len(shape) == 3:
            shape = [1, *shape]
        if len(shape) != 4 or tuple(shape[1:]) != self.shape:
            h, w, c = self.shape
            raise InputError(f"input '{self.input_name}' must have shape [N, {h}, {w}, {c}], got {tensor.get('shape')}")
        n = shape[0]
        if not 1 <= n <= self.max_inputs:
            raise InputError(f"a request holds 1 to {self.max_inputs} inputs, got {n}")
        raw = tensor.get(BINARY)
        if raw is not None:  # binary tensor extension: raw little-endian bytes, no JSON numbers
            width = 1 if dtype == "UINT8" else 4
            if len(raw) != int(np.prod(shape)) * width:
                raise InputError(f"input '{self.input_name}' has {len(raw)} bytes of binary data but shape {shape} "
                                 f"of {dtype} needs {int(np.prod(shape)) * width}")
            arr = np.frombuffer(raw, dtype=np.uint8 if dtype == "UINT8" else "<f4")
        else:
            arr = _flat(tensor.get("data"), "numbers")
        if arr.size != int(np.prod(shape)):
            raise InputError(f"input '{self.input_name}' has {arr.size} values but shape {shape} needs {int(np.prod(shape))}")
        if dtype == "UINT8":
            if arr.dtype != np.uint8:  # JSON numbers (binary UINT8 data is in range by its type)
                if arr.dtype.kind not in "iu":
                    raise InputError("UINT8 data must be integers")
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise InputError("UINT8 data must be in 0..255")
                arr = arr.astype(np.uint8)
        else:
            if arr.dtype.kind not in "iuf":
                raise InputError("FP32 data must be numbers")
            arr = arr.astype(np.float32, copy=False)
            if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255):
                raise InputError("FP32 pixel data must be finite and in 0..255")
        # Items stay numpy [H, W, C] views: no torch op runs on the event loop, where each one
        # waits to get the GIL back from the engine thread (measured: ~0.15 ms a request under
        # load for from_numpy, permute, contiguous, unbind). The engine thread converts a whole
        # batch at once (encode).
        return list(arr.reshape(shape)), [1] * n

    def encode(self, items: Sequence[Any]) -> Any:
        """The batch as the model takes it, on the model's device (moved once, here)."""
        return to_device(self._encode(items), self.device)

    def _encode(self, items: Sequence[Any]) -> Any:
        import torch

        if any(isinstance(it, np.ndarray) for it in items):  # from parse: [H, W, C] arrays
            float_ = any(it.dtype != (np.uint8 if isinstance(it, np.ndarray) else torch.uint8) for it in items)
            if all(isinstance(it, np.ndarray) for it in items):  # one conversion for the batch
                x = torch.from_numpy(np.stack(items).astype(np.float32 if float_ else np.uint8, copy=False))
                return self.encode_fn(list(x.permute(0, 3, 1, 2).unbind(0)))
            items = [torch.from_numpy(np.array(it, dtype=np.float32 if float_ else np.uint8)).permute(2, 0, 1)
                     if isinstance(it, np.ndarray) else it for it in items]
        if len({it.dtype for it in items}) > 1:  # UINT8 and FP32 requests in one batch
            items = [it.float() for it in items]
        return self.encode_fn(list(items))

    def length(self, model_input: Any) -> float | None:
        return None

    def example(self, n: int, tokens: int | None = None) -> list[Any]:
        import torch

        h, w, c = self.shape
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- text

@dataclass
class TextCodec:
    """BYTES strings -> token counts (cost keys) -> padded token tensors.

    `count(texts)` gives each text's token count without truncation; `encode_fn(texts)` pads to
    the longest and cuts at `max_tokens`.
    """

    count: Callable[[list[str]], list[int]]
    encode_fn: Callable[[list[str]], Any]
    max_tokens: int
    long_text: str = "truncate"  # or "reject"
    max_chars: int = 20000  # refused beyond this whatever the rule: bounds tokenizing work
    max_inputs: int = 64
    kind: str = "text"
    input_name: str = "text"
    device: Any = None  # torch.device the token tensors go to (None: stay on the host)

    def __post_init__(self) -> None:
        if self.long_text not in ("truncate", "reject"):
            raise ValueError(f"long_text must be truncate or reject, got {self.long_text!r}")

    def metadata_inputs(self) -> list[dict[str, Any]]:
        return [{"name": self.input_name, "datatype": "BYTES", "shape": [-1],
                 "parameters": {"max_tokens": self.max_tokens, "long_text": self.long_text,
                                "max_chars": self.max_chars}}]

    def parse(self, tensor: dict[str, Any]) -> tuple[list[Any], list[int]]:
        if tensor.get("datatype") != "BYTES":
            raise InputError(f"input '{self.input_name}' must have datatype BYTES, got {tensor.get('datatype')!r}")
        shape = _as_int_shape(tensor.get("shape"))
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InputError(f"input '{self.input_name}' must have shape [N] or [N, 1], got {shape}")
        n = shape[0]
        if not 1 <= n <= self.max_inputs:
            raise InputError(f"a request holds 1 to {self.max_inputs} inputs, got {n}")
        raw = tensor.get(BINARY)
        if raw is not None:
            texts = _binary_strings(raw)
        else:
            data = tensor.get("data")
            if not isinstance(data, list):
                raise InputError("input 'data' must be a list of strings")
            texts = [t for row in data for t in (row if isinstance(row, list) else [row])]
        if len(texts) != n:
            raise InputError(f"input '{self.input_name}' has {len(texts)} strings but shape {shape} needs {n}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i} is not a string")
            if not t.strip():
                raise InputError(f"text {i} is empty")
            if len(t) > self.max_chars:
                raise InputError(f"text {i} has {len(t)} characters; the limit is {self.max_chars}")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:  # JSON "\ud800": a lone surrogate, not a character
                    raise InputError(f"text {i} is not valid Unicode: {e.reason} at character {e.start}") from None
        try:
            counts = self.count(texts)
        except (TypeError, ValueError) as e:  # what a tokenizer raises on input it cannot take
            raise InputError(f"the texts could not be tokenized: {type(e).__name__}: {e}"[:300]) from None
        costs = []
        for i, c in enumerate(counts):
            if c > self.max_tokens:
                if self.long_text == "reject":
                    raise InputError(f"text {i} has {c} tokens; the limit is {self.max_tokens} "
                                     "(the server refuses longer texts: --long-text reject)")
                c = self.max_tokens
            costs.append(int(max(c, 1)))
        return texts, costs

    def encode(self, items: Sequence[Any]) -> Any:
        # token ids are small: pinning them costs more than the copy it would overlap
        return to_device(self.encode_fn(list(items)), self.device, pin=False)

    def length(self, model_input: Any) -> float | None:
        ids = model_input["input_ids"] if isinstance(model_input, dict) else model_input
        return float(ids.shape[1])

    def example(self, n: int, tokens: int | None = None) -> list[Any]:
        """n texts; with `tokens`, about that many tokens each (a word per token)."""
        if tokens is None:
            return ["a warm up sentence for the model"] * n
        return [" ".join(["a"] * max(tokens - 2, 1))] * n


def hf_text_codec(encoder: Any, max_tokens: int | None = None, long_text: str = "truncate", max_inputs: int = 64) -> TextCodec:
    """A codec over the zoo's `TextEncoder` (a Hugging Face tokenizer)."""
    from apparate.zoo.text_workloads import TextEncoder

    import copy

    limit = int(max_tokens or encoder.max_length)
    enc = TextEncoder(encoder.tok, max_length=limit)
    # A fast tokenizer keeps its truncation/padding settings in shared state that every call
    # changes: counting (HTTP thread, no truncation) and encoding (engine thread, truncation and
    # padding) on one object race ("Unable to create tensor ..."). Each thread gets its own.
    tok = copy.deepcopy(encoder.tok)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer itself: it releases the GIL while it works, and len() of an
        # encoding needs no Python list of ids (64 texts of 20,000 characters: 280 ms against
        # 470 ms through the transformers call, most of the difference holding the GIL).
        backend = copy.deepcopy(backend)
        backend.no_truncation()
        backend.no_padding()

    def count(texts: list[str]) -> list[int]:
        if backend is not None:
            return [len(e) for e in backend.encode_batch(texts, add_special_tokens=True)]
        return [len(x) for x in tok(texts, truncation=False, verbose=False)["input_ids"]]

    codec = TextCodec(count=count, encode_fn=enc, max_tokens=limit, long_text=long_text, max_inputs=max_inputs)
    codec.count_tokenizer = tok  # type: ignore[attr-defined] - for tests: not the encoder's
    return codec


# ---------------------------------------------------------------------------------------------- the model

@dataclass
class ServedModel:
    """Everything the engine and the API need about the model they serve."""

    name: str
    ee: Any  # EarlyExitModel
    codec: ImageCodec | TextCodec
    profile: Any  # LatencyProfile
    num_classes: int
    class_names: tuple[str, ...] = ()
    label_map: Sequence[int] | None = None
    recording: Any = None  # bootstrap Recording (initial placement); None: no ramps unless configured
    fingerprint: str = ""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.codec.kind

    @property
    def num_sites(self) -> int:
        return int(self.profile.num_sites)

    @property
    def device(self) -> Any:
        """The torch.device the model runs on (where its parameters are)."""
        from apparate.devices import device_of

        return device_of(self.ee)

    @classmethod
    def from_bundle(cls, bundle: Any, name: str | None = None, max_tokens: int | None = None,
                    long_text: str = "truncate", max_inputs: int = 64, input_shape: tuple[int, int, int] | None = None,
                    encode: Callable | None = None, device: Any = None) -> "ServedModel":
        """From a loaded bundle; the zoo (or hf) workload provides the encoder and input shape.
        `device`: where the model runs (default: where the bundle was loaded, `load_bundle(device=)`);
        the codec moves each batch there."""
        wl = bundle.workload
        if wl is None and encode is None:
            raise ValueError("this bundle has no workload (a custom model): build ServedModel(...) yourself")
        kind = wl.kind if wl is not None else "image"
        enc = encode or wl.encode
        if kind == "text":
            codec: ImageCodec | TextCodec = hf_text_codec(enc, max_tokens, long_text, max_inputs)
        else:
            if input_shape is None:
                stream = wl.stream(wl.bootstrap_stream, n=1)
                x = np.asarray(stream.inputs[0])
                input_shape = tuple(int(s) for s in x.shape)  # [H, W, C]
            codec = ImageCodec(enc, tuple(input_shape), max_inputs=max_inputs)
        ee = bundle.early_exit_model(device=device)
        from apparate.devices import device_of

        dev = device_of(ee)
        codec.device = None if dev.type == "cpu" else dev  # the CPU: encoders' tensors are where they go
        classes = tuple(bundle.manifest.get("class_names") or (wl.class_names if wl is not None else ()))
        num_classes = int(bundle.specs[0].num_classes) if bundle.specs else len(classes)
        return cls(
            name=name or (bundle.manifest.get("workload") or bundle.manifest.get("model", {}).get("workload")
                          or bundle.path.name),
            ee=ee, codec=codec, profile=bundle.profile, num_classes=num_classes,
            class_names=classes, label_map=bundle.label_map, recording=bundle.recording,
            fingerprint=str(bundle.manifest.get("model", {}).get("fingerprint", "")),
            description=str(bundle.manifest.get("description", "")),
        )
