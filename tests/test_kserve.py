"""KServe Open Inference Protocol v2: tiny task models built from configs, real workers."""

from __future__ import annotations

import json
import random
import struct
import threading

import pytest
import requests

import llm_nb
from llm_nb.config import LOAD_ON_REQUEST_HEADER

pytest.importorskip("transformers")

from .conftest import start_host, wait_for  # noqa: E402
from .tiny_tasks import LABELS, build_task_model  # noqa: E402

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def kserve_host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kserve")
    host = start_host(tmp, LLM_NB_MAX_BODY=str(MAX_BODY))
    client = host.client()
    for task in ("text-classification", "token-classification", "fill-mask"):
        folder = build_task_model(tmp / task, task)
        client.load(str(folder), backend="transformers", task=task, name=task.split("-")[0], keep_alive=-1)
    client.load("smollm2", keep_alive=-1)
    yield host
    host.stop()


def auth(host) -> dict:
    return {"Authorization": f"Bearer {host.key}"}


def infer(host, name: str, body) -> requests.Response:
    return requests.post(f"{host.url}/v2/models/{name}/infer", json=body, headers=auth(host), timeout=60)


def get(host, path: str) -> requests.Response:
    return requests.get(host.url + path, headers=auth(host), timeout=30)


def v2_error(response: requests.Response, status: int, code: str) -> str:
    """The message of a v2 error: the protocol's plain string, our stable code beside it and in a header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"], body
    assert body["code"] == code and response.headers["X-LLM-NB-Error-Code"] == code, body
    return body["error"]


def texts_input(texts: list[str], shape: list[int] | None = None) -> dict:
    return {"inputs": [{"name": "input-0", "shape": shape or [len(texts)], "datatype": "BYTES", "data": texts}]}


def test_text_classification_answers_int64_ids_and_fp32_scores(kserve_host):
    body = texts_input(["i love this movie", "i hate this movie", "the cat sat"])
    body["id"] = "req-42"
    response = infer(kserve_host, "text", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "text" and answer["id"] == "req-42"
    (ids,) = answer["outputs"]
    assert ids["name"] == "output-0" and ids["datatype"] == "INT64" and ids["shape"] == [3]
    assert all(isinstance(i, int) and 0 <= i < 2 for i in ids["data"])

    body["parameters"] = {"return_scores": True, "return_labels": True}
    outputs = {o["name"]: o for o in infer(kserve_host, "text", body).json()["outputs"]}
    scores = outputs["scores"]
    assert scores["datatype"] == "FP32" and scores["shape"] == [3, 2]
    rows = [scores["data"][i * 2 : i * 2 + 2] for i in range(3)]
    assert all(abs(sum(row) - 1) < 1e-4 for row in rows)
    assert [max(range(2), key=row.__getitem__) for row in rows] == outputs["output-0"]["data"]
    assert outputs["labels"]["data"] == [LABELS["text-classification"][i] for i in outputs["output-0"]["data"]]


def test_batch_shape_with_a_trailing_one_is_accepted(kserve_host):
    response = infer(kserve_host, "text", texts_input(["good", "bad"], shape=[2, 1]))
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [2]
    assert "id" in response.json()


def test_token_classification_gives_a_padded_id_matrix(kserve_host):
    body = texts_input(["paris is in france", "berlin"])
    body["parameters"] = {"return_labels": True, "return_scores": True}
    outputs = {o["name"]: o for o in infer(kserve_host, "token", body).json()["outputs"]}
    ids = outputs["output-0"]
    assert ids["datatype"] == "INT64" and ids["shape"] == [2, 4]
    assert ids["data"][4:] == [ids["data"][4], -1, -1, -1], "shorter rows are padded with -1"
    assert outputs["tokens"]["data"][:4] == ["paris", "is", "in", "france"]
    assert outputs["labels"]["data"][0] in LABELS["token-classification"]
    assert outputs["scores"]["shape"] == [2, 4]


def test_fill_mask_gives_the_top_token_and_optional_top_k(kserve_host):
    body = texts_input(["the cat sat on the [MASK]", "paris is in [MASK]"])
    outputs = infer(kserve_host, "fill", body).json()["outputs"]
    assert outputs[0]["datatype"] == "BYTES" and outputs[0]["shape"] == [2] and all(outputs[0]["data"])
    body["parameters"] = {"return_scores": True, "top_k": 3}
    named = {o["name"]: o for o in infer(kserve_host, "fill", body).json()["outputs"]}
    assert named["scores"]["shape"] == [2, 3] and named["tokens"]["shape"] == [2, 3]
    assert named["tokens"]["data"][0] == named["output-0"]["data"][0]
    no_mask = infer(kserve_host, "fill", texts_input(["no mask here"]))
    assert "[MASK]" in v2_error(no_mask, 400, "invalid_request")


BAD = [
    ({}, "inputs"),
    ({"inputs": []}, "inputs"),
    ({"inputs": "text"}, "inputs"),
    ({"inputs": [{"name": "input-0", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "BYTES"),
    ({"inputs": [{"name": "input-0", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}]}, "shape"),
    ({"inputs": [{"name": "input-0", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]}, "shape"),
    (
        {"inputs": [{"name": "input-0", "shape": [2, 2], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}]},
        "one text per row",
    ),
    ({"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES"}]}, "data"),
    (
        {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]},
        "no Inference-Header-Content-Length header",
    ),
    ({"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [7]}]}, "strings"),
    ({"inputs": [texts_input(["a"])["inputs"][0]] * 2}, "one input tensor"),
    ({**texts_input(["a"]), "parameters": "x"}, "parameters"),
]


@pytest.mark.parametrize(("body", "says"), BAD)
def test_malformed_requests_get_a_400_that_says_why(kserve_host, body, says):
    assert says in v2_error(infer(kserve_host, "text", body), 400, "invalid_request")


def test_generative_models_are_told_to_use_v1(kserve_host):
    assert "/v1" in v2_error(infer(kserve_host, "smollm2", texts_input(["hello"])), 400, "invalid_request")


def test_health_metadata_and_readiness(kserve_host):
    assert requests.get(kserve_host.url + "/v2/health/live", timeout=5).json() == {"live": True}
    assert get(kserve_host, "/v2/health/ready").json() == {"ready": True}
    meta = get(kserve_host, "/v2/models/text").json()
    assert meta["name"] == "text" and meta["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0] == {"name": "output-0", "datatype": "INT64", "shape": [-1]}
    assert meta["labels"] == LABELS["text-classification"]
    assert get(kserve_host, "/v2/models/text/ready").json() == {"name": "text", "ready": True}
    assert "not loaded" in v2_error(get(kserve_host, "/v2/models/nope/ready"), 404, "model_not_found")


def test_readiness_while_a_model_is_loading(kserve_host, tmp_path):
    folder = build_task_model(tmp_path / "late", "text-classification", seed=1)
    client = kserve_host.client()
    loader = threading.Thread(
        target=lambda: client.load(str(folder), backend="transformers", task="text-classification", name="late")
    )
    loader.start()
    try:
        wait_for(lambda: any(m["name"] == "late" for m in client.status()["models"]), 30, 0.02, "the load to begin")
        loading = get(kserve_host, "/v2/models/late/ready")
        assert loading.status_code == 503 and loading.json() == {"name": "late", "ready": False}
        assert get(kserve_host, "/v2/health/ready").status_code == 503
        # llm-nb's own clients hear "loading" and decide themselves...
        told = requests.post(
            f"{kserve_host.url}/v2/models/late/infer",
            json=texts_input(["good"]),
            headers={"Authorization": f"Bearer {kserve_host.key}", LOAD_ON_REQUEST_HEADER: "0"},
            timeout=60,
        )
        assert "loading" in v2_error(told, 503, "model_loading")
        # ...others wait for the load in progress, as for a load their own first request started.
        waited = infer(kserve_host, "late", texts_input(["good"]))
        assert waited.status_code == 200, waited.text
    finally:
        loader.join(120)
    assert get(kserve_host, "/v2/models/late/ready").json()["ready"] is True
    assert infer(kserve_host, "late", texts_input(["good"])).status_code == 200
    client.unload("late", force=True)


def test_unknown_task_and_non_folder_paths_are_refused(kserve_host, tmp_path):
    client = kserve_host.client()
    from llm_nb.errors import LlmNbError

    (tmp_path / "config.json").write_text("{}")  # a model folder as far as its files go
    with pytest.raises(LlmNbError) as caught:
        client.load(str(tmp_path), backend="transformers", task="summarise-everything", name="odd")
    assert "unknown task" in str(caught.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(LlmNbError, match="without config.json") as caught:
        client.load(str(tmp_path), backend="transformers", task="text-classification", name="odd")
    assert caught.value.code == "invalid_model_file"


# --- the binary tensor data extension, built by hand from the spec ---------------------------

HEADER_LENGTH = "Inference-Header-Content-Length"
TEXTS = ["i love this movie", "i hate this movie", "the cat sat", "paris est très 😀"]  # multi-byte UTF-8 too


def bytes_tensor(texts: list[str]) -> bytes:
    """A BYTES tensor's binary form: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(raw)) + raw for raw in (t.encode() for t in texts))


def binary_infer(host, name: str, header, blob: bytes, path: str | None = None, **headers) -> requests.Response:
    """POST the JSON ``header`` then ``blob``, with ``Inference-Header-Content-Length`` set (unless overridden)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    sent = {**auth(host), "Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head)), **headers}
    url = host.url + (path or f"/v2/models/{name}/infer")
    return requests.post(url, data=head + blob, headers=sent, timeout=60)


def binary_texts_header(texts: list[str], **extra) -> dict:
    size = len(bytes_tensor(texts))
    tensor = {"name": "input-0", "shape": [len(texts)], "datatype": "BYTES", "parameters": {"binary_data_size": size}}
    return {"inputs": [tensor], **extra}


def split_answer(response: requests.Response) -> dict[str, dict]:
    """A binary answer's outputs by name, each binary one's ``data`` decoded from the bytes after the header."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/octet-stream")
    length = int(response.headers[HEADER_LENGTH])
    header, rest = json.loads(response.content[:length]), response.content[length:]
    outputs = {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            assert "data" not in output, "a binary output carries no JSON data"
            chunk, rest = rest[:size], rest[size:]
            output["data"] = decode_tensor(output["datatype"], chunk)
        outputs[output["name"]] = output
    assert rest == b"", "every byte after the header belongs to an output"
    return outputs


def decode_tensor(datatype: str, chunk: bytes) -> list:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(chunk):
            (n,) = struct.unpack_from("<I", chunk, offset)
            items.append(chunk[offset + 4 : offset + 4 + n].decode())
            offset += 4 + n
        return items
    code, width = {"FP32": ("f", 4), "INT64": ("q", 8)}[datatype]
    assert len(chunk) % width == 0
    return list(struct.unpack(f"<{len(chunk) // width}{code}", chunk))


ALL_TEXT_OUTPUTS = [{"name": "output-0"}, {"name": "scores"}, {"name": "labels"}]


def test_a_binary_request_gives_the_json_answer_and_binary_outputs_decode_to_it(kserve_host):
    as_json = infer(kserve_host, "text", {**texts_input(TEXTS), "outputs": ALL_TEXT_OUTPUTS})
    assert as_json.status_code == 200 and as_json.headers["Content-Type"].startswith("application/json")
    expected = {o["name"]: o for o in as_json.json()["outputs"]}

    # Binary input, JSON outputs: the same answer as the all-JSON request.
    header = binary_texts_header(TEXTS, outputs=ALL_TEXT_OUTPUTS)
    mixed = binary_infer(kserve_host, "text", header, bytes_tensor(TEXTS))
    assert mixed.status_code == 200, mixed.text
    assert HEADER_LENGTH not in mixed.headers
    got = {o["name"]: o for o in mixed.json()["outputs"]}
    assert got["output-0"] == expected["output-0"] and got["labels"] == expected["labels"]
    assert got["scores"]["data"] == pytest.approx(expected["scores"]["data"], rel=1e-6)

    # Binary both ways: each output's bytes decode to the JSON answer (scores rounded to float32).
    header["parameters"] = {"binary_data_output": True}
    outputs = split_answer(binary_infer(kserve_host, "text", header, bytes_tensor(TEXTS)))
    assert list(outputs) == ["output-0", "scores", "labels"]
    assert outputs["output-0"]["shape"] == [4] and outputs["output-0"]["parameters"]["binary_data_size"] == 4 * 8
    assert outputs["output-0"]["data"] == expected["output-0"]["data"]
    assert outputs["scores"]["shape"] == [4, 2] and outputs["scores"]["parameters"]["binary_data_size"] == 8 * 4
    assert outputs["scores"]["data"] == pytest.approx(expected["scores"]["data"], rel=1e-6)
    assert outputs["labels"]["data"] == expected["labels"]["data"]


def test_binary_outputs_are_chosen_per_output_and_override_the_request_default(kserve_host):
    body = {
        **texts_input(TEXTS),
        "outputs": [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "labels"}],
    }
    outputs = split_answer(infer(kserve_host, "text", body))  # a JSON request may ask for binary outputs
    assert "binary_data_size" in outputs["scores"]["parameters"] and len(outputs["scores"]["data"]) == 8
    assert "parameters" not in outputs["labels"] and len(outputs["labels"]["data"]) == 4  # still JSON

    body["parameters"] = {"binary_data_output": True}
    body["outputs"] = [{"name": "output-0", "parameters": {"binary_data": False}}, {"name": "scores"}]
    outputs = split_answer(infer(kserve_host, "text", body))
    assert "parameters" not in outputs["output-0"] and "binary_data_size" in outputs["scores"]["parameters"]


def test_binary_bytes_outputs_of_token_classification(kserve_host):
    texts = ["paris is in france", "berlin"]
    header = binary_texts_header(texts, parameters={"binary_data_output": True})
    header["outputs"] = [{"name": "tokens"}, {"name": "output-0"}]
    outputs = split_answer(binary_infer(kserve_host, "token", header, bytes_tensor(texts)))
    assert list(outputs) == ["tokens", "output-0"]
    assert outputs["tokens"]["data"] == ["paris", "is", "in", "france", "berlin", "", "", ""]
    assert outputs["output-0"]["shape"] == [2, 4] and outputs["output-0"]["data"][5:] == [-1, -1, -1]


# --- outputs by name ----------------------------------------------------------------------------


def test_only_the_requested_outputs_come_back_in_the_requested_order(kserve_host):
    body = {**texts_input(["good", "bad"]), "outputs": [{"name": "labels"}]}
    (labels,) = infer(kserve_host, "text", body).json()["outputs"]
    assert labels["name"] == "labels" and set(labels["data"]) <= set(LABELS["text-classification"])

    body["outputs"] = [{"name": "scores"}, {"name": "output-0"}]
    outputs = infer(kserve_host, "text", body).json()["outputs"]
    assert [o["name"] for o in outputs] == ["scores", "output-0"] and outputs[0]["shape"] == [2, 2]

    fill = {**texts_input(["the cat sat on the [MASK]"]), "outputs": [{"name": "scores"}]}
    (scores,) = infer(kserve_host, "fill", fill).json()["outputs"]
    assert scores["name"] == "scores" and scores["shape"] == [1, 5]  # the default top_k


BAD_OUTPUTS = [
    ([{"name": "probabilities"}], "its outputs are output-0, scores, labels"),
    ({"name": "scores"}, "must be a list"),
    (["scores"], '"name"'),
    ([{"name": "scores"}, {"name": "scores"}], "twice"),
    ([{"name": "scores", "parameters": {"binary_data": "yes"}}], "true or false"),
    ([{"name": "scores", "parameters": {"classification": 2}}], "classification extension"),
]


@pytest.mark.parametrize(("outputs", "says"), BAD_OUTPUTS)
def test_bad_requested_outputs_get_a_400_that_says_why(kserve_host, outputs, says):
    response = infer(kserve_host, "text", {**texts_input(["good"]), "outputs": outputs})
    assert says in v2_error(response, 400, "invalid_request")


# --- server metadata, versions, errors, health --------------------------------------------------


def test_server_metadata_names_the_binary_extension(kserve_host):
    assert get(kserve_host, "/v2").json() == {
        "name": "llm-nb",
        "version": llm_nb.__version__,
        "extensions": ["binary_tensor_data"],
    }


def test_version_1_routes_answer_and_other_versions_are_404(kserve_host):
    meta = get(kserve_host, "/v2/models/text/versions/1").json()
    assert meta["versions"] == ["1"] and meta == get(kserve_host, "/v2/models/text").json()
    assert get(kserve_host, "/v2/models/text/versions/1/ready").json() == {"name": "text", "ready": True}
    path = "/v2/models/text/versions/1/infer"
    answer = requests.post(kserve_host.url + path, json=texts_input(["good"]), headers=auth(kserve_host), timeout=60)
    assert answer.json()["model_version"] == "1" and answer.json()["outputs"][0]["shape"] == [1]
    assert infer(kserve_host, "text", texts_input(["good"])).json()["model_version"] == "1"
    binary = binary_infer(kserve_host, "text", ONE, ONE_BLOB, path=path)
    assert binary.json()["model_version"] == "1"

    for path in ("/v2/models/text/versions/2", "/v2/models/text/versions/2/ready"):
        assert "no version '2'" in v2_error(get(kserve_host, path), 404, "model_version_not_found")
    wrong = requests.post(
        f"{kserve_host.url}/v2/models/text/versions/2/infer",
        json=texts_input(["a"]),
        headers=auth(kserve_host),
        timeout=60,
    )
    assert "no version '2'" in v2_error(wrong, 404, "model_version_not_found")
    assert "not loaded" in v2_error(get(kserve_host, "/v2/models/nope/versions/1"), 404, "model_not_found")


def test_errors_on_v2_routes_are_strings_with_a_code_beside(kserve_host):
    assert "not loaded" in v2_error(infer(kserve_host, "nope", texts_input(["a"])), 404, "model_not_found")
    assert "not loaded" in v2_error(get(kserve_host, "/v2/models/nope"), 404, "model_not_found")
    assert "inputs" in v2_error(infer(kserve_host, "text", {"inputs": []}), 400, "invalid_request")
    for path in ("/v2", "/v2/models/text", "/v2/models/text/ready"):
        assert "Bearer" in v2_error(requests.get(kserve_host.url + path, timeout=5), 401, "invalid_api_key")
    no_key = requests.post(f"{kserve_host.url}/v2/models/text/infer", json=texts_input(["a"]), timeout=5)
    assert "Bearer" in v2_error(no_key, 401, "invalid_api_key")


def test_health_routes_need_no_key(kserve_host):
    assert requests.get(kserve_host.url + "/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(kserve_host.url + "/v2/health/ready", timeout=5).json() == {"ready": True}


# --- malformed binary bodies --------------------------------------------------------------------

ONE = binary_texts_header(["good"])
ONE_BLOB = bytes_tensor(["good"])


def with_input(**changes) -> dict:
    tensor = {**ONE["inputs"][0], **changes}
    return {"inputs": [tensor]}


BAD_BINARY = [
    # (JSON header or raw header bytes, bytes after it, extra HTTP headers, what the 400 says)
    (ONE, ONE_BLOB, {HEADER_LENGTH: "twelve"}, "whole number"),
    (ONE, ONE_BLOB, {HEADER_LENGTH: "-4"}, "must be positive"),
    (ONE, ONE_BLOB, {HEADER_LENGTH: "100000"}, "the whole body is only"),
    (b"not json at all", b"", {}, "header) is not valid JSON"),
    (b'{"id": "\\ud800", "inputs": []}', b"", {}, "surrogate"),
    ([ONE], ONE_BLOB, {}, '"inputs" list'),
    (ONE, ONE_BLOB[:-1], {}, "only 7 bytes are left"),
    (ONE, ONE_BLOB + b"extra", {}, "add up to 8"),
    (ONE, struct.pack("<I", 10) + b"good", {}, "element 0 says 10 bytes but only 4 are left"),
    (with_input(parameters={"binary_data_size": 2}), b"\x04\x00", {}, "4-byte length"),
    (ONE, struct.pack("<I", 4) + b"\xff\xfe\xfd\xfc", {}, "not UTF-8"),
    (with_input(data=["good"]), ONE_BLOB, {}, "both data and binary_data_size"),
    (with_input(parameters={"binary_data_size": "8"}), ONE_BLOB, {}, "non-negative integer"),
    (with_input(parameters={"binary_data_size": -8}), ONE_BLOB, {}, "non-negative integer"),
    (with_input(shape=[2]), ONE_BLOB, {}, "shape [2] holds 2 elements"),
    (with_input(datatype="FP32", shape=[2]), struct.pack("<2f", 1, 2), {}, "must be BYTES"),
    (with_input(datatype="FP32", parameters={"binary_data_size": 6}), b"\x00" * 6, {}, "whole number of FP32"),
    (with_input(datatype="COMPLEX"), ONE_BLOB, {}, "cannot be sent in binary"),
    ({**ONE, "parameters": {"binary_data_output": "yes"}}, ONE_BLOB, {}, "true or false"),
]


@pytest.mark.parametrize(("header", "blob", "headers", "says"), BAD_BINARY, ids=range(len(BAD_BINARY)))
def test_malformed_binary_bodies_get_a_400_that_says_why(kserve_host, header, blob, headers, says):
    response = binary_infer(kserve_host, "text", header, blob, **headers)
    assert says in v2_error(response, 400, "invalid_request")
    assert requests.get(kserve_host.url + "/v2/health/live", timeout=5).ok


def test_binary_bodies_over_the_limit_are_413_and_the_host_keeps_answering(kserve_host):
    big = ["x" * 1000] * (MAX_BODY // 1000 + 10)
    response = binary_infer(kserve_host, "text", binary_texts_header(big), bytes_tensor(big))
    assert "limit" in v2_error(response, 413, "request_too_large")
    good = binary_infer(kserve_host, "text", ONE, ONE_BLOB)
    assert good.status_code == 200 and good.json()["outputs"][0]["shape"] == [1]


def test_mutated_binary_bodies_never_get_a_5xx(kserve_host):
    # Seeded byte flips, truncations, insertions and wrong header lengths of one valid binary request.
    rng = random.Random(16)
    texts = ["good movie", "très bad", "paris"]
    head = json.dumps(binary_texts_header(texts, parameters={"binary_data_output": True})).encode()
    body = head + bytes_tensor(texts)
    statuses = set()
    for _ in range(150):
        mutated, length = bytearray(body), len(head)
        kind = rng.randrange(4)
        if kind == 0:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        elif kind == 1:
            del mutated[rng.randrange(len(mutated)) :]
        elif kind == 2:
            at = rng.randrange(len(mutated))
            mutated[at:at] = rng.randbytes(rng.randint(1, 6))
        else:
            length = rng.randint(0, len(body) + 8)
        response = requests.post(
            f"{kserve_host.url}/v2/models/text/infer",
            data=bytes(mutated),
            headers={**auth(kserve_host), HEADER_LENGTH: str(length)},
            timeout=60,
        )
        statuses.add(response.status_code)
        if response.status_code != 200:
            v2_error(response, 400, "invalid_request")
    assert statuses == {200, 400}, "some mutations should still be valid, most not"
    valid = binary_infer(
        kserve_host, "text", {**binary_texts_header(texts), "outputs": [{"name": "scores"}]}, bytes_tensor(texts)
    )
    assert valid.status_code == 200 and valid.json()["outputs"][0]["shape"] == [3, 2]
