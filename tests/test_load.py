"""Load: 32 streaming clients at once, 20 requests each, against the default model.

Zero failed requests (429s are not retried here: they would count as failures), latency
percentiles and tokens/s printed (run with -s to see them), and the host's RSS after the
run within 5 % of its RSS before it.
"""

from __future__ import annotations

import psutil
import pytest

from llm_nb import consume

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLIENTS = 32
REQUESTS_EACH = 20
TOPICS = ["rivers", "owls", "bread", "trains", "tea", "glass", "bees", "maps"]


def test_32_streaming_clients_x_20_requests(host):
    client = host.client()
    client.load("smollm2")
    api = f"{host.url}/v1"
    host_process = psutil.Process(host.process.pid)
    # Warm-up: connection pools, the first stream and the token issuer are one-time costs.
    consume.fire(api, ["Hello"] * CLIENTS, concurrency=CLIENTS, api_key=host.key, model="smollm2",
                 max_tokens=4, compare_sequential=False, progress=False, retries=0)  # fmt: skip
    rss_before = host_process.memory_info().rss

    prompts = [f"One sentence about {TOPICS[i % len(TOPICS)]}, please." for i in range(CLIENTS * REQUESTS_EACH)]
    report = consume.fire(
        api, prompts, concurrency=CLIENTS, api_key=host.key, model="smollm2", stream=True,
        max_tokens=16, compare_sequential=False, progress=False, retries=0,
    )  # fmt: skip
    rss_after = host_process.memory_info().rss
    summary = report.summary
    print(
        f"\n{summary['requests']} requests, {CLIENTS} at once: {summary['errors']} failed; "
        f"latency p50 {summary['p50_s']:.2f} s, p99 {summary['p99_s']:.2f} s; "
        f"time to first token p50 {summary['ttft_p50_s']:.2f} s; {summary['tokens_per_s']:.1f} tokens/s; "
        f"host RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert summary["errors"] == 0, [r.error for r in report.errors][:5]
    assert summary["ok"] == CLIENTS * REQUESTS_EACH and summary["retries"] == 0
    assert summary["completion_tokens"] >= CLIENTS * REQUESTS_EACH  # every stream carried text
    assert abs(rss_after - rss_before) / rss_before < 0.05, (rss_before, rss_after)
    status = client.status()["models"][0]
    assert status["in_flight"] == 0 and status["state"] == "ready"
