"""Hub mode: each user's share of the budget, and what each user sees of the others.

A model held by several users counts once, split among them: three users on one
7B model hold a third of it each. A load that would take a user past their share
is refused (507) with the share, what they hold and what to unload. A user sees
their own leases in full and other users' as a count; admins see every name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..config import format_bytes, parse_size
from ..errors import InsufficientMemory, InvalidRequest
from .loaded import Lease, LoadedModel


@dataclass(frozen=True)
class HubUser:
    """A user as the Hub named them. ``admin``: a Hub admin, or granted llm-nb's admin scope or group."""

    name: str
    admin: bool = False
    groups: frozenset[str] = field(default_factory=frozenset)


def parse_share(value: str | int | float) -> tuple[str, float]:
    """``"0.5"`` / ``0.5`` / ``"50%"``: a fraction of the budget; ``"8GiB"`` / ``8e9``: bytes."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            number = float(text[:-1]) / 100
        else:
            number = float(text)
            if number > 1:
                return "bytes", number
        if not 0 < number <= 1:
            raise ValueError
        return "fraction", number
    except ValueError:
        pass
    try:
        return "bytes", float(parse_size(text))
    except InvalidRequest:
        raise InvalidRequest(
            f"cannot read {value!r} as a user's share: write a fraction of the budget (0.5 or 50%) or a size (8GiB)"
        ) from None


class Shares:
    """Who may hold how much: a default for everyone, and values per user or per group (``group:NAME``).

    From ``LLM_NB_USER_SHARE`` (default: the whole budget) and ``LLM_NB_USER_SHARES``, a JSON
    object (or the path of a JSON file) such as ``{"alice": "20GiB", "group:students": 0.25}``.
    A user's own value wins; else the largest of their groups'; else the default.
    """

    def __init__(self, default: str | float = 1.0, overrides: dict[str, str | float] | None = None):
        self.default = parse_share(default)
        self.overrides = {key: parse_share(value) for key, value in (overrides or {}).items()}

    @classmethod
    def from_env(cls) -> Shares:
        default = os.environ.get("LLM_NB_USER_SHARE", "1") or "1"
        raw = os.environ.get("LLM_NB_USER_SHARES", "").strip()
        overrides = {}
        if raw:
            text = raw if raw.startswith("{") else open(os.path.expanduser(raw)).read()  # noqa: SIM115
            try:
                overrides = json.loads(text)
            except ValueError as exc:
                raise InvalidRequest(f"LLM_NB_USER_SHARES is not a JSON object: {exc}") from None
            if not isinstance(overrides, dict):
                raise InvalidRequest('LLM_NB_USER_SHARES must be a JSON object like {"alice": "8GiB"}')
        return cls(default, overrides)

    def bytes_for(self, user: HubUser, budget: int) -> tuple[int, str]:
        """The user's share in bytes, and where it comes from (for the refusal)."""

        def size(share: tuple[str, float]) -> int:
            kind, number = share
            return int(budget * number) if kind == "fraction" else int(number)

        if user.name in self.overrides:
            return size(self.overrides[user.name]), f"the share set for {user.name}"
        by_group = [(size(self.overrides[f"group:{g}"]), g) for g in user.groups if f"group:{g}" in self.overrides]
        if by_group:
            best, group = max(by_group)
            return best, f"the share of group {group}"
        return size(self.default), "each user's share (LLM_NB_USER_SHARE)"


def holder_users(model: LoadedModel) -> set[str]:
    return {lease.user for lease in model.leases.values() if lease.user is not None}


def holdings(models: Iterable[LoadedModel], user: str, kind: str) -> list[tuple[str, int, int]]:
    """``(model, this user's part in bytes, how many users split it)`` for each model the user holds."""
    held = []
    for model in models:
        users = holder_users(model)
        if user in users:
            held.append((model.spec.name, model.cost_bytes(kind) // len(users), len(users)))
    return held


def check_share(users: dict[str, HubUser], shares: Shares, models: Iterable[LoadedModel], budget: int, kind: str):
    """The registry's admission check: ``(lease, model or None, cost, name) -> None``, or a 507."""

    def check(lease: Lease | None, model: LoadedModel | None, cost: int, name: str) -> None:
        if lease is None or lease.user is None or lease.user not in users:
            return
        user = users[lease.user]
        if model is not None and lease.user in holder_users(model):
            return  # another notebook of the same user: their part does not change
        share, source = shares.bytes_for(user, budget)
        splitters = len(holder_users(model)) + 1 if model is not None else 1
        part = cost // splitters
        held = holdings(models, user.name, kind)
        holding = sum(p for _, p, _ in held)
        if holding + part <= share:
            return
        listed = ", ".join(
            f"{m} ({format_bytes(p)}" + (f", split with {n - 1} other user{'s' if n > 2 else ''})" if n > 1 else ")")
            for m, p, n in held
        )
        what = f"attaching to {name!r}" if model is not None else f"loading {name!r}"
        raise InsufficientMemory(
            f"{what} would take {user.name} to {format_bytes(holding + part)}, past {source}: "
            f"{format_bytes(share)} of the {format_bytes(budget)} {kind.upper()} budget. "
            f"{user.name} holds {format_bytes(holding)}: {listed or 'nothing'}"
            + (
                f" (this model would add {format_bytes(part)}, split with {splitters - 1} other user(s))"
                if splitters > 1
                else f" (this model needs about {format_bytes(part)})"
            )
            + ". Unload one of yours (`%llm_unload NAME`, `llm-nb unload NAME`), or ask a Hub admin for a larger share.",
            code="user_share_exceeded",
            share_bytes=share,
            held_bytes=holding,
            needed_bytes=part,
        )

    return check


def holders_phrase(model_status: dict, viewer: str) -> str:
    """ "held by you (2 notebooks) and 3 other users", from a model's status as this viewer sees it."""
    own = [lease for lease in model_status.get("leases", []) if lease.get("user") == viewer]
    others = model_status.get("other_holders") or {}
    parts = []
    if own:
        parts.append(f"you ({len(own)} notebook{'s' if len(own) != 1 else ''})")
    named = sorted(
        {lease["user"] for lease in model_status.get("leases", []) if lease.get("user") not in (None, viewer)}
    )
    parts += named
    count = others.get("users", 0)
    if count:
        parts.append(f"{count} other user{'s' if count != 1 else ''}")
    if not parts:
        return "held by nobody"
    return "held by " + (" and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1])


def view_for(models: list[dict], user: HubUser) -> list[dict]:
    """The models' status as ``user`` sees it: their own leases; the rest as a count (admins: every lease)."""
    shown = []
    for model in models:
        leases = model.get("leases", [])
        if user.admin:
            entry = dict(model, other_holders={"users": 0, "leases": 0})
        else:
            mine = [lease for lease in leases if lease.get("user") == user.name]
            others = [lease for lease in leases if lease.get("user") != user.name]
            entry = dict(model, leases=mine)
            entry["other_holders"] = {"users": len({lease.get("user") for lease in others}), "leases": len(others)}
            if not mine:  # where another user's model lives is theirs: no files, logs or processes of it
                entry.update(path=None, log_file=None, worker_pid=None, url=None)
        entry["holders"] = holders_phrase(entry, user.name)
        shown.append(entry)
    return shown


def describe_holders_privately(model: LoadedModel) -> str:
    """Who holds a model, for messages any user may read: counts, never names."""
    users = holder_users(model)
    if not model.leases:
        return "nobody"
    return f"{len(users)} user{'s' if len(users) != 1 else ''} ({len(model.leases)} lease{'s' if len(model.leases) != 1 else ''})"
