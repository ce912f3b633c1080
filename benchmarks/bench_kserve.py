"""KServe v2 infer: JSON against the binary tensor data extension, side by side in one run.

One host, the tiny BERT text classifier the tests build (tests/tiny_tasks.py,
random weights, CPU), a batch of 32 texts per request, asking for the class
ids and the scores. "json" sends the texts as a JSON BYTES tensor and reads
JSON outputs; "binary" sends them length-prefixed after the JSON header and
asks for every output in binary (``binary_data_output``), decoding INT64 and
FP32 bytes. Requests go one after another on one keep-alive connection; each
round runs both ways, the order flipping every round so that drift in machine
load hits both alike. Usage:

    python benchmarks/bench_kserve.py [--rounds 5] [--requests 100] [--batch 32]

Prints, per way, the median requests/s over rounds and the bytes sent and
received per request, then the binary/json ratio. It also checks that both
ways give the same class ids and (to float32) the same scores.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402

from llm_nb.client import Client  # noqa: E402
from tests.tiny_tasks import WORDS, build_task_model  # noqa: E402

HEADER = "Inference-Header-Content-Length"
OUTPUTS = [{"name": "output-0"}, {"name": "scores"}]


def make_texts(batch: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(batch)]


def json_way(session: requests.Session, url: str, texts: list[str]) -> tuple[list[int], list[float], int, int]:
    """One JSON infer: (ids, scores, bytes sent, bytes received)."""
    body = json.dumps(
        {"inputs": [{"name": "input-0", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], "outputs": OUTPUTS}
    ).encode()
    response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    response.raise_for_status()
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    return outputs["output-0"], outputs["scores"], len(body), len(response.content)


def binary_way(session: requests.Session, url: str, texts: list[str]) -> tuple[list[int], list[float], int, int]:
    """One binary infer, both ways: (ids, scores, bytes sent, bytes received)."""
    blob = b"".join(struct.pack("<I", len(raw)) + raw for raw in (t.encode() for t in texts))
    tensor = {
        "name": "input-0",
        "shape": [len(texts)],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(blob)},
    }
    head = json.dumps({"inputs": [tensor], "outputs": OUTPUTS, "parameters": {"binary_data_output": True}}).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER: str(len(head))}
    response = session.post(url, data=head + blob, headers=headers, timeout=60)
    response.raise_for_status()
    length = int(response.headers[HEADER])
    content = memoryview(response.content)
    offset = length
    decoded = {}
    for output in json.loads(content[:length].tobytes())["outputs"]:
        size = output["parameters"]["binary_data_size"]
        code, width = {"INT64": ("q", 8), "FP32": ("f", 4)}[output["datatype"]]
        decoded[output["name"]] = list(struct.unpack_from(f"<{size // width}{code}", content, offset))
        offset += size
    return decoded["output-0"], decoded["scores"], len(head) + len(blob), len(response.content)


def timed(way, session: requests.Session, url: str, texts: list[str], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        way(session, url, texts)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="requests per way per round")
    parser.add_argument("--batch", type=int, default=32, help="texts per request")
    args = parser.parse_args()
    texts = make_texts(args.batch)
    ways = {"json": json_way, "binary": binary_way}

    with tempfile.TemporaryDirectory() as tmp, running_host(Path(tmp)) as (info, conn):
        folder = build_task_model(Path(tmp) / "classifier", "text-classification")
        Client(conn, autostart=False).load(
            str(folder),
            backend="transformers",
            task="text-classification",
            name="classifier",
            options={"device": "cpu"},
        )
        url = info["url"] + "/v2/models/classifier/infer"
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {info['key']}"

        answers = {name: way(session, url, texts) for name, way in ways.items()}  # also warms both paths
        (ids, scores, *_), (binary_ids, binary_scores, *_) = answers["json"], answers["binary"]
        assert ids == binary_ids, "the two ways disagree on the class ids"
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(scores, binary_scores, strict=True)), (
            "the two ways disagree on the scores beyond float32 rounding"
        )

        rates: dict[str, list[float]] = {name: [] for name in ways}
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            for name in order:
                rates[name].append(timed(ways[name], session, url, texts, args.requests))

    print(
        f"KServe v2 infer · tiny BERT text classifier (CPU) · {args.batch} texts per request · "
        f"{args.requests} requests per way per round · {args.rounds} rounds (medians)"
    )
    print(f"{'way':<8}{'requests/s':>12}{'texts/s':>10}{'bytes sent':>12}{'bytes received':>16}")
    medians = {}
    for name in ways:
        medians[name] = statistics.median(rates[name])
        sent, received = answers[name][2], answers[name][3]
        print(f"{name:<8}{medians[name]:>12.1f}{medians[name] * args.batch:>10.0f}{sent:>12}{received:>16}")
    print(f"binary / json = {medians['binary'] / medians['json']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
