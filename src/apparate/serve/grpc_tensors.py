"""Open Inference Protocol v2 over gRPC: protobuf messages to and from what the HTTP API uses.

The messages are the KServe / Triton protocol's generated bindings as `tritonclient[grpc]` ships
them (`tritonclient.grpc.service_pb2`); nothing here defines the protocol. A request's input
tensor becomes the same dict the HTTP API parses (`protocol.parse_infer`, the codecs), so every
check and every error message is shared: raw input contents (`raw_input_contents`, the binary
layout of Triton's binary tensor extension) or typed `contents`. Responses reuse
`protocol.infer_response` and carry its outputs as raw output contents, as Triton's do, and its
early-exit details as response parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .model_io import BINARY, InputError
from .protocol import InferRequest, parse_infer

# Where each datatype's values sit in InferTensorContents (the protocol's table).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}
RAW_DTYPES = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4", "BOOL": "?"}


def pb() -> Any:
    """The generated protocol module (imported on first use: gRPC is an optional extra)."""
    try:
        from tritonclient.grpc import service_pb2
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("gRPC serving needs the grpc extra: pip install 'apparate[grpc]'") from e
    return service_pb2


def parameter_value(p: Any) -> Any:
    """An InferParameter's value as a Python scalar."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def set_parameter(p: Any, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, (int, np.integer)):
        p.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def request_parameters(req: Any) -> dict[str, Any]:
    return {k: parameter_value(v) for k, v in req.parameters.items()}


def _tensor(t: Any, raw: bytes | None) -> dict[str, Any]:
    """One InferInputTensor as the HTTP API's JSON tensor."""
    tensor: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": [int(s) for s in t.shape]}
    if raw is not None:
        tensor[BINARY] = raw
        return tensor
    field = CONTENTS.get(t.datatype)
    if field is None:
        raise InputError(f"unknown datatype {t.datatype!r}")
    values = list(getattr(t.contents, field))
    if t.datatype == "BYTES":
        try:
            values = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise InputError("BYTES contents must be UTF-8 text") from None
    tensor["data"] = values
    return tensor


def parse_request(req: Any, codec: Any, class_names: tuple[str, ...]) -> InferRequest:
    """A ModelInferRequest as the HTTP API's InferRequest (raises InputError, as it does)."""
    raws = list(req.raw_input_contents)
    if raws and len(raws) != len(req.inputs):
        raise InputError(f"{len(raws)} raw input contents for {len(req.inputs)} inputs: send one per input, or none")
    payload: dict[str, Any] = {"inputs": [_tensor(t, raws[i] if raws else None) for i, t in enumerate(req.inputs)]}
    if req.id:
        payload["id"] = req.id
    if req.outputs:
        payload["outputs"] = [{"name": o.name} for o in req.outputs]
    return parse_infer(payload, codec, class_names)


def _raw(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in data]
        return b"".join(len(b).to_bytes(4, "little") + b for b in parts)
    return np.asarray(data, dtype=RAW_DTYPES[datatype]).tobytes()


def infer_response(body: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Any:
    """`protocol.infer_response`'s dict as a ModelInferResponse (outputs as raw contents)."""
    m = pb()
    out = m.ModelInferResponse(model_name=body["model_name"], model_version=body["model_version"],
                               id=body.get("id", ""))
    for k, v in {**body["parameters"], **(extra or {})}.items():
        set_parameter(out.parameters[k], v)
    for o in body["outputs"]:
        out.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        out.raw_output_contents.append(_raw(o["datatype"], o["data"]))
    return out


def model_metadata(meta: Mapping[str, Any]) -> Any:
    """`protocol.model_metadata`'s dict as a ModelMetadataResponse."""
    m = pb()
    tensors = m.ModelMetadataResponse.TensorMetadata
    return m.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
        outputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])
