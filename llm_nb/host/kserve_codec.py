"""The Open Inference Protocol's binary tensor data extension, both ways.

A request or response body is a JSON header followed by raw tensor bytes; the
``Inference-Header-Content-Length`` HTTP header gives the header's length.
Each tensor sent in binary says its byte count in ``parameters.binary_data_size``
and the tensors' bytes follow one another in the order the JSON lists them.
Numbers are little-endian and packed; a ``BYTES`` element is a 4-byte
little-endian length, then that many bytes. (KServe's
docs/predict-api/v2/binary_tensor_data_extension.md and Triton's binary_data
extension describe the same format.)
"""

from __future__ import annotations

import math
import struct
from typing import Any

from ..errors import InvalidRequest
from .http import dumps, parse_json

HEADER = "Inference-Header-Content-Length"
#: What a body with binary tensors is sent as (Triton answers so; its clients split on ``HEADER``).
MEDIA_TYPE = "application/octet-stream"

#: struct's codes for the fixed-size datatypes, whose binary form is the packed little-endian values.
FIXED = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
_LENGTH = struct.Struct("<I")


def split_body(raw: bytes, header_length: str) -> tuple[Any, memoryview]:
    """The JSON header and the tensor bytes after it, or a 400 that says what does not add up."""
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidRequest(f"{HEADER} must be a whole number of bytes, not {header_length[:40]!r}") from None
    if length <= 0:
        raise InvalidRequest(f"{HEADER} must be positive (the length of the JSON header), not {length}")
    if length > len(raw):
        raise InvalidRequest(f"{HEADER} is {length} bytes but the whole body is only {len(raw)} bytes")
    header = parse_json(raw[:length], f"the first {length} bytes of the body (the {HEADER} header)")
    return header, memoryview(raw)[length:]


def decode_inputs(header: Any, blob: memoryview) -> None:
    """Put each binary input's elements into its ``data``, in place, taking ``blob`` in order.

    ``BYTES`` elements become text (the models here read text); every inconsistency is a 400.
    """
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list):
        raise InvalidRequest('the JSON header must be an object with an "inputs" list')
    offset = 0
    for index, tensor in enumerate(inputs):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue  # a JSON input: its data is in the header
        name = tensor.get("name", f"#{index}")
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"input {name!r}: binary_data_size must be a non-negative integer, not {size!r}")
        if "data" in tensor:
            raise InvalidRequest(f"input {name!r} has both data and binary_data_size; send its data one way")
        if offset + size > len(blob):
            raise InvalidRequest(
                f"input {name!r} says binary_data_size {size} but only {len(blob) - offset} bytes are left "
                f"after the JSON header and the inputs before it"
            )
        tensor["data"] = decode_tensor(name, tensor.get("datatype"), tensor.get("shape"), blob[offset : offset + size])
        offset += size
    if offset != len(blob):
        raise InvalidRequest(
            f"the body has {len(blob)} bytes after the JSON header but the inputs' binary_data_size add up to {offset}"
        )


def decode_tensor(name: str, datatype: Any, shape: Any, chunk: memoryview) -> list:
    """One tensor's elements, flat in row-major order."""
    if datatype == "BYTES":
        return _decode_bytes(name, chunk)
    code = FIXED.get(datatype) if isinstance(datatype, str) else None
    if code is None:
        raise InvalidRequest(
            f"input {name!r}: datatype {datatype!r} cannot be sent in binary here; use one of BYTES, {', '.join(FIXED)}"
        )
    width = struct.calcsize(code)
    if len(chunk) % width:
        raise InvalidRequest(f"input {name!r}: {len(chunk)} bytes is not a whole number of {datatype} ({width} bytes)")
    count = len(chunk) // width
    if isinstance(shape, list) and all(isinstance(d, int) for d in shape) and math.prod(shape) != count:
        raise InvalidRequest(
            f"input {name!r}: shape {shape} holds {math.prod(shape)} elements but its bytes hold {count}"
        )
    return list(struct.unpack(f"<{count}{code}", chunk))


def _decode_bytes(name: str, chunk: memoryview) -> list[str]:
    texts = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise InvalidRequest(
                f"input {name!r}: element {len(texts)} starts {len(chunk) - offset} bytes before the end of the "
                "tensor, too few for its 4-byte length"
            )
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise InvalidRequest(
                f"input {name!r}: element {len(texts)} says {length} bytes but only {len(chunk) - offset} are left "
                "in the tensor's binary_data_size"
            )
        try:
            texts.append(str(chunk[offset : offset + length], "utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"input {name!r}: element {len(texts)} is not UTF-8 text: {exc}") from None
        offset += length
    return texts


def encode_tensor(datatype: str, data: list) -> bytes:
    """A tensor's flat elements in binary form."""
    if datatype == "BYTES":
        parts = []
        for element in data:
            raw = element.encode() if isinstance(element, str) else bytes(element)
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return struct.pack(f"<{len(data)}{FIXED[datatype]}", *data)


def encode_response(answer: dict, binary: set[str]) -> tuple[bytes, int]:
    """``(body, header length)``: the outputs named in ``binary`` move out of the JSON into the bytes after it."""
    blobs = []
    for output in answer["outputs"]:
        if output["name"] in binary:
            blob = encode_tensor(output["datatype"], output.pop("data"))
            output.setdefault("parameters", {})["binary_data_size"] = len(blob)
            blobs.append(blob)
    head = dumps(answer).encode()
    return head + b"".join(blobs), len(head)
