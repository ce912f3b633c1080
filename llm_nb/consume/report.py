"""What ``fire`` measured: one row per request, percentiles, and the one-at-a-time baseline, as text, HTML and a plot."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestResult:
    index: int
    prompt: str
    ok: bool = False
    status: int | None = None
    error: str | None = None
    started_s: float = 0.0  # since the batch began
    latency_s: float | None = None
    ttft_s: float | None = None  # time to first token (streamed answers only)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    tokens_counted: str | None = None  # "usage" (the server's count) or "chunks" (stream chunks)
    attempts: int = 0
    text: str = ""


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _batch_summary(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "p50_s": _percentile(latencies, 50),
        "p90_s": _percentile(latencies, 90),
        "p99_s": _percentile(latencies, 99),
        "mean_s": sum(latencies) / len(latencies) if latencies else None,
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p90_s": _percentile(ttfts, 90),
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "completion_tokens": sum(tokens) if tokens else None,
        "tokens_per_s": sum(tokens) / wall if tokens and wall > 0 else None,
        "retries": sum(max(0, r.attempts - 1) for r in results),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}{unit}" if abs(value) < 100 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


@dataclass
class Report:
    """What ``fire`` measured: one row per request, a summary, and the one-at-a-time baseline."""

    api_url: str
    protocol: str
    model: str | None
    concurrency: int
    stream: bool
    results: list[RequestResult]
    wall_s: float
    sequential: list[RequestResult] | None = None
    sequential_wall_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        summary = {"concurrency": self.concurrency, **_batch_summary(self.results, self.wall_s)}
        if self.sequential and self.sequential_wall_s:
            base = _batch_summary(self.sequential, self.sequential_wall_s)
            summary["sequential_prompts"] = len(self.sequential)
            summary["sequential_wall_s"] = self.sequential_wall_s
            summary["sequential_p50_s"] = base["p50_s"]
            summary["sequential_tokens_per_s"] = base["tokens_per_s"]
            # Time per request, one at a time against in parallel: the baseline may be a sample of the prompts.
            per_request = self.wall_s / len(self.results)
            summary["speedup"] = (
                self.sequential_wall_s / len(self.sequential) / per_request if self.wall_s > 0 else None
            )
        return summary

    @property
    def sequential_label(self) -> str:
        """What the baseline sent: ``one at a time`` or ``one at a time (first 8 of 100 prompts)``."""
        sent = len(self.sequential or [])
        return (
            "one at a time"
            if sent == len(self.results)
            else f"one at a time (first {sent} of {len(self.results)} prompts)"
        )

    @property
    def errors(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    def rows(self, sequential: bool = False) -> list[dict]:
        return [asdict(r) for r in (self.sequential or [] if sequential else self.results)]

    def to_pandas(self, sequential: bool = False):
        """One row per request (``sequential=True``: the one-at-a-time baseline)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.rows(sequential)).set_index("index")

    # --- rendering -----------------------------------------------------------
    def _summary_lines(self) -> list[tuple[str, str]]:
        s = self.summary
        lines = [
            ("endpoint", f"{self.api_url} ({self.protocol}{', ' + self.model if self.model else ''})"),
            ("requests", f"{s['ok']} ok, {s['errors']} errors, {s['retries']} retries, concurrency {self.concurrency}"),
            (
                "latency p50 / p90 / p99",
                f"{_fmt(s['p50_s'], ' s')} / {_fmt(s['p90_s'], ' s')} / {_fmt(s['p99_s'], ' s')}",
            ),
            ("time to first token p50", _fmt(s["ttft_p50_s"], " s")),
            ("throughput", f"{_fmt(s['requests_per_s'])} requests/s, {_fmt(s['tokens_per_s'])} tokens/s"),
            ("wall time", _fmt(s["wall_s"], " s")),
        ]
        if "speedup" in s:
            lines.append(
                (
                    self.sequential_label,
                    f"{_fmt(s['sequential_wall_s'], ' s')} wall, {_fmt(s['sequential_tokens_per_s'])} tokens/s "
                    f"→ speed-up {_fmt(s['speedup'], '×')}",
                )
            )
        return lines

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self._summary_lines())
        text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in self._summary_lines())
        for r in self.errors[:5]:
            text += f"\nrequest {r.index} failed ({r.status}): {r.error}"
        return text

    def __repr__(self) -> str:
        return f"<Report {self.protocol} {len(self.results)} requests>\n{self}"

    def plot(self, ax=None):
        """Latency plot: each request's span on a timeline (first token marked), parallel over one at a time."""
        from matplotlib.figure import Figure

        runs = [("parallel", self.results)]
        if self.sequential:
            runs.append((self.sequential_label, self.sequential))
        if ax is None:
            fig = Figure(figsize=(8, 1.2 + 0.25 * len(self.results) * len(runs)))
            axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
        else:
            fig, axes = ax.figure, [ax]
            runs = runs[:1]
        for axis, (label, results) in zip(axes, runs, strict=False):
            for r in results:
                if r.latency_s is None:
                    continue
                color = "tab:blue" if r.ok else "tab:red"
                axis.barh(r.index, r.latency_s, left=r.started_s, color=color, alpha=0.6, height=0.8)
                if r.ttft_s is not None:
                    axis.barh(r.index, r.ttft_s, left=r.started_s, color=color, alpha=1.0, height=0.8)
            axis.set_ylabel(f"{label}\nrequest")
            axis.invert_yaxis()
        axes[-1].set_xlabel("seconds since the batch began (dark: until the first token)")
        s = self.summary
        title = f"p50 {_fmt(s['p50_s'], ' s')} · p90 {_fmt(s['p90_s'], ' s')}"
        if s.get("speedup"):
            title += f" · speed-up {s['speedup']:.2f}× over {self.sequential_label}"
        axes[0].set_title(title)
        fig.tight_layout()
        return fig

    def _plot_png(self) -> str | None:
        try:
            fig = self.plot()
        except ImportError:
            return None
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        return base64.b64encode(buffer.getvalue()).decode()

    def _repr_html_(self) -> str:
        from html import escape

        summary = "".join(
            f"<tr><th style='text-align:left'>{escape(k)}</th><td style='text-align:left'>{escape(v)}</td></tr>"
            for k, v in self._summary_lines()
        )
        head = "".join(f"<th>{h}</th>" for h in ("#", "status", "latency s", "TTFT s", "tokens", "answer / error"))
        body = ""
        for r in self.results:
            answer = (r.text if r.ok else r.error or "")[:120]
            body += (
                f"<tr><td>{r.index}</td><td>{r.status if r.status is not None else '-'}</td>"
                f"<td>{_fmt(r.latency_s)}</td><td>{_fmt(r.ttft_s)}</td><td>{_fmt(r.completion_tokens)}</td>"
                f"<td style='text-align:left'>{escape(answer)}</td></tr>"
            )
        png = self._plot_png()
        plot = (
            f"<img src='data:image/png;base64,{png}'/>" if png else "<p><i>pip install matplotlib for the plot</i></p>"
        )
        return (
            f"<div><table>{summary}</table>{plot}"
            f"<details><summary>{len(self.results)} requests</summary><table><tr>{head}</tr>{body}</table></details></div>"
        )
