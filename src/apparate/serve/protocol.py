"""Open Inference Protocol v2 (KServe / Triton) JSON: requests in, responses out.

Requests carry one input tensor (the model's input: `input` for images, `text` for text). A
tensor of N inputs is split into N engine requests that share a deadline; the HTTP response is
sent when all N are released (so it waits for the slowest of them: send one input per request to
get each answer as early as it exists).

Responses hold, per input, the output tensors `label` (INT64, the class index), `class_name`
(BYTES, when the model has class names), `confidence` (FP32), `exit_site` (INT32, the site whose
ramp released the answer, -1 for the model's own output) and `early_exit` (BOOL). The response's
`parameters` hold the early-exit details as scalars: for one input `exit_site`, `confidence`,
`early_exit`, `queue_ms`, `compute_ms`, `latency_ms`, `batch_size`, `config_version`; for N
inputs `inputs`, `early_exits` (how many), `exit_sites` (comma-separated, in input order) and
the largest `queue_ms`, `compute_ms` and `latency_ms`.

Binary tensor extension (Triton's): with the HTTP header `Inference-Header-Content-Length: K`
the first K bytes of the body are the JSON request and the rest is raw tensor data; an input
whose `parameters.binary_data_size` is set takes that many bytes, in input order, instead of
`data`: little-endian values for numbers, and for BYTES each element as a 4-byte little-endian
length followed by its bytes. Responses are always JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .model_io import BINARY, InputError
from .requests import Answer

HEADER_LENGTH = "inference-header-content-length"

OUTPUTS = ("label", "class_name", "confidence", "exit_site", "early_exit")


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    items: list[Any]
    costs: list[int]
    outputs: tuple[str, ...]


def output_names(class_names: Sequence[str]) -> tuple[str, ...]:
    return tuple(o for o in OUTPUTS if o != "class_name" or class_names)


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body."""
    if header_length is None:
        return body, b""
    try:
        k = int(header_length)
    except ValueError:
        raise InputError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 < k <= len(body):
        raise InputError(f"Inference-Header-Content-Length {k} does not fit a body of {len(body)} bytes")
    return body[:k], body[k:]


_DATA = re.compile(rb'"data"\s*:\s*\[')
_NUMERIC = b"0123456789+-.eE, \t\r\nNaInfity"  # JSON numbers (and Python's NaN/Infinity), commas, blanks
_PLACEHOLDER = "\u0000apparate:decoded-array\u0000"
PIECE_BYTES = 64 << 10  # a piece takes about 1 ms to decode here: the longest the GIL is held


def decode_json(head: bytes, piecewise: bool = False, piece_bytes: int = PIECE_BYTES) -> Any:
    """json.loads, except that with `piecewise` a large flat numeric `data` array (an image
    tensor sent as JSON numbers) is decoded PIECE_BYTES at a time into a numpy array.

    Decoding 64 CIFAR images as JSON numbers holds the GIL for 10-70 ms in one C call: on a
    worker thread that still stalls the event loop for that long. Between pieces the
    interpreter hands the GIL over, so the stall is bounded by one piece. The result is what
    json.loads gives, with that one list as an array; anything unusual (strings, nesting, the
    array found anywhere but the first tensor's `data`) falls back to json.loads."""
    if not piecewise or len(head) < 2 * piece_bytes:
        return json.loads(head)
    m = _DATA.search(head)
    end = head.find(b"]", m.end()) if m is not None else -1
    if m is None or end < 0 or end - m.end() < piece_bytes:
        return json.loads(head)
    inner = head[m.end():end]
    if inner.translate(None, _NUMERIC):  # something other than numbers: nested lists, strings, ...
        return json.loads(head)
    if inner.rstrip().endswith(b","):
        raise ValueError("a trailing comma in the 'data' array")
    try:
        rest = json.loads(head[:m.end() - 1] + json.dumps(_PLACEHOLDER).encode() + head[end + 1:])
        tensor = rest["inputs"][0]
        found = tensor["data"] == _PLACEHOLDER
    except (ValueError, KeyError, IndexError, TypeError):
        found = False
    if not found:
        return json.loads(head)
    pieces, pos = [], 0
    while pos < len(inner):
        cut = inner.find(b",", pos + piece_bytes)
        cut = len(inner) if cut < 0 else cut
        part = json.loads(b"[" + inner[pos:cut] + b"]")  # raises on a malformed number, as json.loads would
        pieces.append(np.asarray(part))
        pos = cut + 1
    tensor["data"] = np.concatenate(pieces) if pieces else np.zeros(0)
    return rest


def attach_binary(payload: Any, raw: bytes) -> None:
    """Give each input with `binary_data_size` its slice of the binary part."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        return
    pos = 0
    for t in payload["inputs"]:
        params = t.get("parameters") if isinstance(t, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"binary_data_size must be a non-negative integer, got {size!r}")
        if pos + size > len(raw):
            raise InputError(f"binary_data_size {size} runs past the {len(raw) - pos} bytes of binary data left")
        t[BINARY] = raw[pos:pos + size]
        pos += size
    if pos != len(raw):
        raise InputError(f"{len(raw) - pos} bytes of binary data are not claimed by any input's binary_data_size")


def parse_infer(payload: Any, codec: Any, class_names: Sequence[str] = ()) -> InferRequest:
    if not isinstance(payload, dict):
        raise InputError("the request body must be a JSON object with an 'inputs' list")
    req_id = payload.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InputError("'id' must be a string")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        raise InputError(f"this model takes one input tensor ('{codec.input_name}'), got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise InputError("each input must be an object with name, shape, datatype and data")
    if tensor.get("name") != codec.input_name:
        raise InputError(f"unknown input {tensor.get('name')!r}: this model's input is '{codec.input_name}'")
    known = output_names(class_names)
    outputs = known
    req_out = payload.get("outputs")
    if req_out is not None:
        if not isinstance(req_out, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in req_out):
            raise InputError("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in req_out]
        bad = [n for n in names if n not in known]
        if bad:
            raise InputError(f"unknown outputs {bad}; this model has {list(known)}")
        outputs = tuple(names)
    items, costs = codec.parse(tensor)
    return InferRequest(req_id, items, costs, outputs)


def infer_response(model_name: str, req: InferRequest, answers: Sequence[Answer],
                   class_names: Sequence[str] = ()) -> dict[str, Any]:
    n = len(answers)
    columns = {
        "label": ("INT64", [a.label for a in answers]),
        "class_name": ("BYTES", [class_names[a.label] if 0 <= a.label < len(class_names) else str(a.label)
                                 for a in answers] if class_names else []),
        "confidence": ("FP32", [round(a.confidence, 6) for a in answers]),
        "exit_site": ("INT32", [a.exit_site for a in answers]),
        "early_exit": ("BOOL", [a.early for a in answers]),
    }
    outputs = [{"name": o, "datatype": columns[o][0], "shape": [n], "data": columns[o][1]} for o in req.outputs]
    if n == 1:
        a = answers[0]
        params: dict[str, Any] = {"exit_site": a.exit_site, "confidence": round(a.confidence, 6), "early_exit": a.early,
                                  "queue_ms": round(a.queue_ms, 3), "compute_ms": round(a.compute_ms, 3),
                                  "latency_ms": round(a.latency_ms, 3), "batch_size": a.batch_size,
                                  "config_version": a.version}
    else:
        params = {"inputs": n, "early_exits": sum(a.early for a in answers),
                  "exit_sites": ",".join(str(a.exit_site) for a in answers),
                  "queue_ms": round(max(a.queue_ms for a in answers), 3),
                  "compute_ms": round(max(a.compute_ms for a in answers), 3),
                  "latency_ms": round(max(a.latency_ms for a in answers), 3)}
    out: dict[str, Any] = {"model_name": model_name, "model_version": "1", "parameters": params, "outputs": outputs}
    if req.id is not None:
        out["id"] = req.id
    return out


def model_metadata(served: Any, policy: str) -> dict[str, Any]:
    classes = tuple(served.class_names)
    types = {"label": "INT64", "class_name": "BYTES", "confidence": "FP32", "exit_site": "INT32", "early_exit": "BOOL"}
    return {
        "name": served.name,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": served.codec.metadata_inputs(),
        "outputs": [{"name": o, "datatype": types[o], "shape": [-1]} for o in output_names(classes)],
        "parameters": {"early_exit": True, "policy": policy, "num_sites": served.num_sites,
                       "num_classes": served.num_classes, "kind": served.kind,
                       "max_inputs": served.codec.max_inputs,
                       "class_names": ",".join(classes), "description": served.description},
    }
