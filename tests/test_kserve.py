"""KServe Open Inference Protocol v2: tiny task models built from configs, real workers."""

from __future__ import annotations

import threading

import pytest
import requests

pytest.importorskip("transformers")

from .conftest import start_host, wait_for  # noqa: E402
from .tiny_tasks import LABELS, build_task_model  # noqa: E402


@pytest.fixture(scope="module")
def kserve_host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kserve")
    host = start_host(tmp)
    client = host.client()
    for task in ("text-classification", "token-classification", "fill-mask"):
        folder = build_task_model(tmp / task, task)
        client.load(str(folder), backend="transformers", task=task, name=task.split("-")[0], keep_alive=-1)
    client.load("smollm2", keep_alive=-1)
    yield host
    host.stop()


def infer(host, name: str, body) -> requests.Response:
    return requests.post(
        f"{host.url}/v2/models/{name}/infer", json=body, headers={"Authorization": f"Bearer {host.key}"}, timeout=60
    )


def get(host, path: str) -> requests.Response:
    return requests.get(host.url + path, headers={"Authorization": f"Bearer {host.key}"}, timeout=30)


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
    assert no_mask.status_code == 400 and "[MASK]" in no_mask.json()["error"]["message"]


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
    ({"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [7]}]}, "strings"),
    ({"inputs": [texts_input(["a"])["inputs"][0]] * 2}, "one input tensor"),
    ({**texts_input(["a"]), "parameters": "x"}, "parameters"),
]


@pytest.mark.parametrize(("body", "says"), BAD)
def test_malformed_requests_get_a_400_that_says_why(kserve_host, body, says):
    response = infer(kserve_host, "text", body)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]


def test_generative_models_are_told_to_use_v1(kserve_host):
    response = infer(kserve_host, "smollm2", texts_input(["hello"]))
    assert response.status_code == 400 and "/v1" in response.json()["error"]["message"]


def test_health_metadata_and_readiness(kserve_host):
    assert requests.get(kserve_host.url + "/v2/health/live", timeout=5).json() == {"live": True}
    assert get(kserve_host, "/v2/health/ready").json() == {"ready": True}
    meta = get(kserve_host, "/v2/models/text").json()
    assert meta["name"] == "text" and meta["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0] == {"name": "output-0", "datatype": "INT64", "shape": [-1]}
    assert meta["labels"] == LABELS["text-classification"]
    assert get(kserve_host, "/v2/models/text/ready").json() == {"name": "text", "ready": True}
    assert get(kserve_host, "/v2/models/nope/ready").status_code == 404


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
        early = infer(kserve_host, "late", texts_input(["good"]))
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
    finally:
        loader.join(120)
    assert get(kserve_host, "/v2/models/late/ready").json()["ready"] is True
    assert infer(kserve_host, "late", texts_input(["good"])).status_code == 200
    client.unload("late", force=True)


def test_unknown_task_and_non_folder_paths_are_refused(kserve_host, tmp_path):
    client = kserve_host.client()
    from llm_nb.errors import LlmNbError

    with pytest.raises(LlmNbError) as caught:
        client.load(str(tmp_path), backend="transformers", task="summarise-everything", name="odd")
    assert "unknown task" in str(caught.value)
