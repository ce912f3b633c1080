"""What the host's verbs answer, as types that own their text and Markdown forms.

The Python API returns these; the magics, the widget panel and the command line
print them, so that a load, a status table or an unload reads the same wherever
it is shown. Kernel side: imports no client, no IPython, no model library.
"""

from __future__ import annotations

from datetime import datetime

from .config import format_bytes

__all__ = ["LoadResult", "Status", "Undeployed", "UnloadResult", "cache_cell", "deployment_cells", "deployment_wait"]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


def _until(model: dict, none: str) -> str:
    """When a model with no holders goes: a time, "forever" (pinned), or ``none``."""
    if model.get("expires_at"):
        return _clock(model["expires_at"])
    return "forever" if model.get("keep_alive", 0) < 0 and not model["leases"] else none


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def cache_cell(model: dict) -> str:
    """A model's conversation cache in a few words: entries, bytes of its cap, hit rate; "-" where it has none."""
    cache = (model.get("info") or {}).get("prompt_cache")
    if not cache:
        return "-"
    if not cache.get("cap_bytes"):
        return "off"
    cell = f"{cache['entries']} · {format_bytes(cache['bytes'])} of {format_bytes(cache['cap_bytes'])}"
    if cache.get("hit_rate") is not None:
        cell += f" · {100 * cache['hit_rate']:.0f}% hits"
    return cell


DEPLOYMENT_COLUMNS = ("DEPLOYMENT", "VERSION", "ENGINE", "REPLICAS", "MEMORY", "STATE", "SERVED")


def deployment_cells(dep: dict) -> tuple[str, ...]:
    """One deployment as ``DEPLOYMENT_COLUMNS`` show it: replicas running/target, memory only where measured."""
    replicas = dep.get("replicas") or {}
    target = replicas.get("target")
    memory = dep.get("rss_bytes")  # 0 or None: not measured (a Ray cluster's replicas, a worker not up yet)
    return (
        dep["name"],
        f"v{dep['version']}",
        dep.get("engine") or "local",
        f"{replicas.get('running', 0)}/{'auto' if target is None else target}",
        format_bytes(memory) if memory else "-",
        dep["state"],
        str(dep.get("requests_served", 0)),
    )


def deployment_wait(dep: dict) -> str | None:
    """Why a Ray deploy in progress waits (Ray cannot place its replicas), while it does; else None."""
    ray = dep.get("ray") or {}
    if dep.get("state") == "deploying" and ray.get("waiting_for_resources") and ray.get("message"):
        return ray["message"]
    return None


class _Lines(dict):
    """A host answer shown as lines of text (and the same lines in Markdown)."""

    def lines(self) -> list[str]:
        raise NotImplementedError

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_markdown_(self) -> str:
        return "  \n".join(_md_cell(line) for line in self.lines())


class UnloadResult(_Lines):
    """The host's answer to an unload: one model's (``name``, ``unloaded``, ...) or ``results`` for several."""

    @property
    def items(self) -> list[dict]:
        return list(self["results"]) if "results" in self else [dict(self)]

    def lines(self) -> list[str]:
        if not self.items:
            return ["this notebook holds no models"]
        return [f"{item['name']}: {self.describe(item)}" for item in self.items]

    @staticmethod
    def describe(item: dict) -> str:
        if item.get("unloaded"):
            # A forced unload answers without remaining_leases, and names every holder it let go.
            forced = "remaining_leases" not in item and item.get("released")
            return "unloaded, memory freed" + (f" (released: {', '.join(item['released'])})" if forced else "")
        remaining = item.get("remaining_leases", 0)
        state = f"released; {remaining} other notebook{'s' * (remaining != 1)} still hold{'s' * (remaining == 1)} it"
        if item.get("expires_at"):
            state += f"; unloads at {_clock(item['expires_at'])} unless used again"
        return state


class Undeployed(_Lines):
    """The host's answer to an undeploy: ``name``, ``version``, ``requests_served``."""

    def lines(self) -> list[str]:
        return [f"{self['name']}: undeployed v{self['version']} after {self['requests_served']} requests"]


def holders_text(model: dict) -> str:
    """Who holds a model: the notebooks' names, or on a JupyterHub's shared host "you (2 notebooks) and 3 other
    users" (the host says it so; other users' notebooks are theirs)."""
    if model.get("holders"):
        return str(model["holders"]).removeprefix("held by ")
    return ", ".join(lease["name"] for lease in model.get("leases") or [])


class LoadResult(dict):
    """The host's answer to a load: ``model`` (its status), ``attached``, ``lease``, ``other_holders``, ``seconds``."""

    @property
    def summary(self) -> str:
        model = self["model"]
        parts = [model["name"], model["backend"], model.get("device") or "?", format_bytes(model.get("memory_bytes"))]
        if not self.get("attached") and self.get("round_trip_s") is not None:
            parts.append(f"loaded in {self['round_trip_s']:.2f} s")  # what the caller waited, worker start included
        elif model.get("load_seconds") is not None:
            parts.append(f"loaded in {model['load_seconds']:.2f} s")
        line = " · ".join(parts)
        if self.get("attached"):
            n = len(self.get("other_holders") or [])
            took = self.get("round_trip_s", self["seconds"]) * 1000
            if model.get("holders"):  # a JupyterHub's shared host: "held by you (1 notebook) and 2 other users"
                return line + f" · attached in {took:.0f} ms: already loaded, now {model['holders']}"
            line += f" · attached in {took:.0f} ms: " + (
                f"already loaded for {n} other notebook{'s' * (n != 1)}"
                if n
                else "already loaded; no other notebook holds it"
            )
        return line

    def __str__(self) -> str:
        return self.summary

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary)

    def _repr_markdown_(self) -> str:
        return _md_cell(self.summary)


class Status(dict):
    """The host's status (``/api/status``), shown as a table of models, then one of deployments."""

    @property
    def deployments(self) -> list[dict]:
        return self.get("deployments") or []  # a host from before deployments sends none

    def _failures(self) -> list[tuple[str, str]]:
        return [
            (item["name"], item["failure"])
            for item in [*self.get("models", []), *self.deployments]
            if item.get("failure")
        ]

    def _waits(self) -> list[tuple[str, str]]:
        return [(d["name"], wait) for d in self.deployments if (wait := deployment_wait(d))]

    def _share_line(self) -> str | None:
        """Hub mode: who the host takes this caller for, and their share of its budget."""
        user, share = self.get("user"), self.get("share")
        if not user or not share:
            return None
        return (
            f"you are {user['name']}{' (admin)' if user.get('admin') else ''} on the JupyterHub's shared host: "
            f"you hold {format_bytes(share['held_bytes'])} of your {format_bytes(share['bytes'])} share"
        )

    def to_text(self) -> str:
        """Fixed-width tables, as ``llm-nb ps`` prints them."""
        rows = [("NAME", "BACKEND", "DEVICE", "STATE", "MEMORY", "CACHE", "HELD BY", "IN FLIGHT", "SERVED", "UNTIL")]
        for m in self.get("models", []):
            holders = holders_text(m) or "-"  # a token sees none
            rows.append(
                (
                    m["name"],
                    m["backend"],
                    m.get("device") or "-",
                    m["state"],
                    format_bytes(m["memory_bytes"]),
                    cache_cell(m),
                    holders,
                    str(m["in_flight"]),
                    str(m["requests_served"]),
                    _until(m, "-"),
                )
            )
        lines = _table(rows)
        if self.deployments:
            lines += ["", *_table([DEPLOYMENT_COLUMNS, *map(deployment_cells, self.deployments)])]
        lines.append(
            f"budget: {format_bytes(self.get('used_bytes', 0))} of {format_bytes(self.get('budget_bytes'))} "
            f"({str(self.get('budget_kind', 'ram')).upper()}) used · host pid {self.get('pid')} at {self.get('url')}"
        )
        if share := self._share_line():
            lines.append(share)
        lines += [f"{name} failed: {failure}" for name, failure in self._failures()]
        lines += [f"{name} waits for Ray: {wait}" for name, wait in self._waits()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_markdown(self) -> str:
        rows = ["| model | backend | device | state | memory | cache | held by | in flight | until |", "|---" * 9 + "|"]
        for m in self.get("models", []):
            holders = _md_cell(holders_text(m)) or "—"
            rows.append(
                f"| {_md_cell(m['name'])} | {m['backend']} | {m.get('device') or '—'} | {m['state']} | "
                f"{format_bytes(m['memory_bytes'])} | {_md_cell(cache_cell(m))} | {holders} | {m['in_flight']} | "
                f"{_until(m, '—')} |"
            )
        if not self.get("models"):
            rows = ["*no models loaded*"]
        if self.deployments:
            rows += ["", "| " + " | ".join(c.lower() for c in DEPLOYMENT_COLUMNS) + " |", "|---" * 7 + "|"]
            rows += ["| " + " | ".join(map(_md_cell, deployment_cells(d))) + " |" for d in self.deployments]
        used, budget = self.get("used_bytes", 0), self.get("budget_bytes") or 1
        rows.append("")
        rows.append(
            f"budget: **{format_bytes(used)}** of {format_bytes(budget)} {str(self.get('budget_kind', 'ram')).upper()} "
            f"({100 * used / budget:.0f} %) · host pid {self.get('pid')} at {self.get('url')}"
        )
        if share := self._share_line():
            rows.append(f"\n{_md_cell(share)}")
        rows += [f"\n**{_md_cell(name)} failed:** {_md_cell(failure)}" for name, failure in self._failures()]
        rows += [f"\n**{_md_cell(name)} waits for Ray:** {_md_cell(wait)}" for name, wait in self._waits()]
        return "\n".join(rows)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.to_text())

    def model(self, name: str) -> dict | None:
        return next((m for m in self.get("models", []) if m["name"] == name), None)

    def deployment(self, name: str) -> dict | None:
        return next((d for d in self.deployments if d["name"] == name), None)
