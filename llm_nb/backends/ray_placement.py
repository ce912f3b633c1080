"""Whether a Ray deployment's replicas can be placed, and in words why not.

What a replica asks for comes from its ``ray_actor_options`` (Ray Serve's
default is one CPU); what the cluster has, per node, from Ray. A replica is
placed on one node, so "fits" counts whole replicas node by node, the way Ray's
scheduler must. Three answers, checked before the application is deployed
and again while it waits:

- it can never fit: more than the cluster could hold empty (or, with an
  autoscaler, more than its largest configured size);
- it cannot fit beside what runs now: the Serve applications holding the rest
  are named (an llm-nb deployment of this user by its own name);
- it fits.

The facts come from Ray's own view: ``ray.nodes()`` for what each node has,
and the GCS's record of free resources and pending actors, which needs no
dashboard (the local head runs without one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from ..config import format_bytes

#: Serve replica states that hold their resources (a STOPPING replica gives them back when it is gone).
HOLDING_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING", "PENDING_MIGRATION")


def replica_ask(ray_actor_options: dict | None) -> dict[str, float]:
    """The resources one replica reserves: Ray Serve's default of one CPU unless ``num_cpus`` says otherwise."""
    options = ray_actor_options or {}
    ask = {
        "CPU": 1.0 if options.get("num_cpus") is None else float(options["num_cpus"]),
        "GPU": float(options.get("num_gpus") or 0),
        "memory": float(options.get("memory") or 0),
    }
    ask.update({str(k): float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in ask.items() if v > 0}


def replicas_that_fit(ask: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many replicas asking ``ask`` each the ``nodes`` (their resources) can take, one node at a time."""
    if not ask:
        return sys.maxsize  # asks for nothing: Ray places it anywhere
    # Ray keeps resources in units of 1/10000: the small margin absorbs float rounding such as 0.3 + 0.7.
    return sum(int(min(node.get(k, 0.0) / need for k, need in ask.items()) + 1e-6) for node in nodes)


def resources_text(resources: dict[str, float]) -> str:
    """``{"CPU": 2, "memory": 2**30}`` as ``2 CPUs, 1.0 GiB memory``; custom resources by name."""
    return ", ".join(_amount(key, value) for key, value in resources.items()) or "nothing"


def free_text(free: dict[str, float], total: dict[str, float]) -> str:
    """``0 of 2 CPUs``, one part for each resource in ``free``."""
    parts = []
    for key, value in free.items():
        of = _amount(key, total.get(key, 0.0))
        parts.append(f"{format_bytes(value)} of {of}" if key == "memory" else f"{value:g} of {of}")
    return ", ".join(parts)


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{format_bytes(value)} memory"
    if key in ("CPU", "GPU"):
        return f"{value:g} {key}{'s' * (value != 1)}"
    return f"{value:g} {key!r}"


@dataclass
class Holder:
    """A Serve application that holds resources on the cluster."""

    label: str  # "'a'" for this user's llm-nb deployment a, else the application's name
    replicas: int
    ask: dict[str, float]

    def text(self) -> str:
        each = resources_text(self.ask)
        return f"{self.label} ({self.replicas} replica{'s' * (self.replicas != 1)} × {each})"


@dataclass
class Placement:
    """One look at whether ``replicas`` replicas asking ``ask`` each fit on the cluster."""

    ask: dict[str, float]
    replicas: int
    total: dict[str, float]  # the cluster's, summed over its nodes
    free: dict[str, float]
    fit_empty: int  # replicas the cluster could take if nothing ran (up to its autoscaler's ceiling)
    fit_now: int  # replicas it can take beside what runs now
    autoscaling: bool  # the cluster has an autoscaler: a wait may end with a new node
    holders: list[Holder] = field(default_factory=list)
    running: int = 0  # this application's own replicas that run already
    pending: int = 0  # this application's replicas that Ray has not placed

    @property
    def never_fits(self) -> bool:
        return self.fit_empty < self.replicas

    def needs_text(self) -> str:
        relevant = {k: self.free.get(k, 0.0) for k in self.ask}
        return f"each replica needs {resources_text(self.ask)}; the cluster has {free_text(relevant, self.total)} free"

    def holders_text(self) -> str:
        if not self.holders:
            return "nothing else on the cluster holds them: they are reserved by Ray tasks or actors of other programs"
        return "held by " + ", ".join(holder.text() for holder in self.holders)

    def never_fits_text(self) -> str:
        ceiling = "at its autoscaler's largest size" if self.autoscaling else "empty"
        return (
            f"{self.replicas} replica{'s' * (self.replicas != 1)} can never fit on this Ray cluster: "
            f"{self.needs_text()}, and even {ceiling} it holds only {self.fit_empty} such replica"
            f"{'s' * (self.fit_empty != 1)}. Ask for fewer replicas or smaller ray_actor_options "
            "(num_cpus may be a fraction, such as 0.5)"
        )

    def busy_text(self) -> str:
        waiting = self.pending or max(0, self.replicas - self.running - self.fit_now)
        return (
            f"{waiting} of {self.replicas} replicas cannot be placed beside what runs now: {self.needs_text()}, "
            f"{self.holders_text()}. Undeploy one of those, ask for fewer replicas, or wait "
            "(--wait-for-resources SECONDS)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "replica_needs": self.ask,
            "replicas": self.replicas,
            "pending_replicas": self.pending,
            "cluster_total": self.total,
            "cluster_free": self.free,
            "autoscaling": self.autoscaling,
            "held_by": [{"name": h.label, "replicas": h.replicas, "each": h.ask} for h in self.holders],
        }


def look(app: str, user_prefix: str, ask: dict[str, float], replicas: int) -> Placement:
    """Ask the connected Ray cluster (``ray.init`` done) where ``app``'s replicas would go."""
    import ray

    totals = [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]
    free_by_node = _free_by_node(totals)
    ceiling = _autoscaler_ceiling()
    details = _serve_details()
    holders, running = _holders(details, app, user_prefix)
    fit_empty = replicas_that_fit(ask, totals)
    if ceiling is not None:
        fit_empty = max(fit_empty, replicas_that_fit(ask, [ceiling]))
    return Placement(
        ask=ask,
        replicas=replicas,
        total=_sum(totals),
        free=_sum(free_by_node),
        fit_empty=fit_empty,
        fit_now=replicas_that_fit(ask, free_by_node),
        autoscaling=ceiling is not None,
        holders=holders,
        running=running,
        pending=unplaced_replicas(app),
    )


def _sum(nodes: list[dict[str, float]]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            summed[key] = summed.get(key, 0.0) + float(value)
    return summed


def _free_by_node(totals: list[dict[str, float]]) -> list[dict[str, float]]:
    """Free resources node by node, from the GCS; where that view is missing, the cluster's sum as one node."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        return [dict(node) for node in available_resources_per_node().values()]
    except Exception:  # an older or newer Ray without it: the sum is what ray.available_resources() gives
        return [dict(ray.available_resources())] if totals else []


def _autoscaler_ceiling() -> dict[str, float] | None:
    """The most an autoscaling cluster may grow to (its configured node groups), or None without an autoscaler."""
    try:
        from ray._private.state import state

        ceiling = state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return {k: float(v) for k, v in ceiling.items()} if ceiling else None


def _serve_details() -> dict:
    """Every Serve application's deployments, their replicas and actor options (the controller's own view)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().get_serve_details() or {}
    except Exception:
        return {}


def _holders(details: dict, app: str, user_prefix: str) -> tuple[list[Holder], int]:
    """Other applications whose replicas hold resources, and how many of this one's run."""
    holders: list[Holder] = []
    running = 0
    for name, application in sorted((details.get("applications") or {}).items()):
        for deployment in (application.get("deployments") or {}).values():
            replicas = [r for r in deployment.get("replicas") or [] if _state(r) in HOLDING_STATES]
            if name == app:
                running = sum(_state(r) == "RUNNING" for r in replicas)
                continue
            ask = deployment.get("required_resources") or replica_ask(
                (deployment.get("deployment_config") or {}).get("ray_actor_options")
            )
            ask = {k: float(v) for k, v in ask.items() if v}
            if replicas and ask:
                label = (
                    repr(name[len(user_prefix) :]) if name.startswith(user_prefix) else f"Serve application {name!r}"
                )
                holders.append(Holder(label, len(replicas), ask))
    return holders, running


def starting_replicas(app: str) -> list[str]:
    """The actor names of ``app``'s replicas that have not begun to serve (unplaced, or in init)."""
    names = []
    for deployment in ((_serve_details().get("applications") or {}).get(app) or {}).get("deployments", {}).values():
        names += [
            r["actor_name"] for r in deployment.get("replicas") or [] if _state(r) == "STARTING" and r.get("actor_name")
        ]
    return names


def _state(replica: dict) -> str:
    state = replica.get("state")
    return str(getattr(state, "value", state))


def uncreated_replicas(app: str) -> list[dict]:
    """``app``'s replica actors that Ray has not created yet (``Name``, and ``Pid`` once placed)."""
    try:
        from ray._private.state import actors

        pending = actors(actor_state_name="PENDING_CREATION").values()
    except Exception:
        return []
    marker = f"ServeReplica:{app}:"
    return [actor for actor in pending if str(actor.get("ActorClassName", "")).startswith(marker)]


def unplaced_replicas(app: str) -> int:
    """How many of ``app``'s replicas wait for resources: a replica Ray placed has a pid while its process starts."""
    return sum(1 for actor in uncreated_replicas(app) if not actor.get("Pid"))
