"""Hub mode: who is calling, as the JupyterHub says, and which users still run a server.

In hub mode one host serves every user of a JupyterHub. A request carries the
user's own Hub API token (the ``JUPYTERHUB_API_TOKEN`` their server and kernels
have); the Hub, asked through ``jupyterhub.services.auth.HubAuth`` (whose answers
are cached), names the user. Nothing a client says about itself is believed.
The service's own token (``read:users``, ``list:users``, ``read:servers``) looks up
whether a user is an admin and which users' servers run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp

from ..errors import LlmNbError, PermissionDenied
from .http import Principal
from .users import HubUser, Shares, check_share, describe_holders_privately

log = logging.getLogger("llm_nb.host.hub")

#: The scope (a JupyterHub custom scope) that makes a user an llm-nb admin without being a Hub admin.
ADMIN_SCOPE = "custom:llm-nb:admin"
#: How long a user's details (admin, groups) are trusted before the Hub is asked again.
USER_CACHE_S = 60.0


class HubUnavailable(LlmNbError):
    code, status = "hub_unavailable", 503


@dataclass
class HubSettings:
    """Where the Hub is and how the service speaks to it; from the environment the Hub gives its services."""

    api_url: str
    service_name: str = "llm-nb"
    #: A file holding the service's API token: the keeper rewrites it at every Hub start, so a host
    #: that outlived a Hub restart speaks with the token of the Hub that runs now.
    token_file: Path | None = None
    token: str = ""
    admin_groups: frozenset[str] = frozenset()
    cache_s: float = USER_CACHE_S

    @classmethod
    def from_env(cls) -> HubSettings:
        api_url = os.environ.get("JUPYTERHUB_API_URL", "")
        if not api_url:
            raise LlmNbError(
                "hub mode needs JUPYTERHUB_API_URL (the Hub sets it for its services); "
                "run the host as a Hub service: `llm-nb hub-service`",
                code="invalid_request",
                status=400,
            )
        token_file = os.environ.get("LLM_NB_HUB_TOKEN_FILE")
        groups = os.environ.get("LLM_NB_ADMIN_GROUPS", "")
        return cls(
            api_url=api_url.rstrip("/"),
            service_name=os.environ.get("JUPYTERHUB_SERVICE_NAME", "llm-nb"),
            token_file=Path(token_file) if token_file else None,
            token=os.environ.get("JUPYTERHUB_API_TOKEN", ""),
            admin_groups=frozenset(g.strip() for g in groups.split(",") if g.strip()),
        )

    def service_token(self) -> str:
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip() or self.token
            except OSError:
                pass
        return self.token


class HubIdentity:
    """Users from their tokens (``HubAuth``, cached), their details, and which of them run a server."""

    def __init__(self, settings: HubSettings):
        try:
            from jupyterhub.services.auth import HubAuth
        except ImportError:
            raise LlmNbError(
                "hub mode asks the Hub who calls, with jupyterhub's HubAuth: install it beside llm-nb "
                "(pip install 'llm-nb[hub]', or pip install jupyterhub)",
                code="invalid_request",
                status=400,
            ) from None

        self.settings = settings
        self.auth = HubAuth(
            api_url=settings.api_url,
            api_token=settings.service_token() or "unused",
            cache_max_age=int(settings.cache_s),
        )
        self._details: dict[str, tuple[float, dict]] = {}
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def user_for_token(self, token: str) -> HubUser | None:
        """The user a token belongs to, or None when the Hub does not know it (forged, revoked, expired)."""
        try:
            model = await self.auth.user_for_token(token, sync=False)
        except Exception as exc:  # tornado's HTTPError, a refused connection: the Hub is down or restarting
            raise HubUnavailable(
                f"the JupyterHub at {self.settings.api_url} does not answer ({exc}), so this token cannot be "
                "checked; retry when the Hub is back (the host keeps running, and so do your models)",
                retry_after=5,
            ) from None
        if not model or model.get("kind", "user") != "user" or not model.get("name"):
            return None
        name = str(model["name"])
        details = await self.details(name)
        groups = frozenset(details.get("groups") or model.get("groups") or ())
        admin = (
            bool(details.get("admin"))
            or ADMIN_SCOPE in (model.get("scopes") or ())
            or bool(groups & self.settings.admin_groups)
        )
        return HubUser(name=name, admin=admin, groups=groups)

    async def _get(self, path: str) -> dict | list | None:
        headers = {"Authorization": f"token {self.settings.service_token()}"}
        async with self._http().get(self.settings.api_url + path, headers=headers) as response:
            if response.status == 404:
                return None
            if response.status >= 400:
                text = (await response.text())[:300]
                raise HubUnavailable(f"the Hub answered {response.status} to {path}: {text}")
            return await response.json()

    async def details(self, name: str) -> dict:
        """A user's model as the service may read it (admin, groups); cached, {} if the Hub cannot say."""
        cached = self._details.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.settings.cache_s:
            return cached[1]
        try:
            model = await self._get(f"/users/{quote(name, safe='')}") or {}
        except (HubUnavailable, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("could not read user %s from the Hub: %s", name, exc)
            return cached[1] if cached else {}
        self._details[name] = (time.monotonic(), model)
        return model

    async def running_servers(self) -> dict[str, set[str]] | None:
        """``{user: {server name, ...}}`` for every server the Hub has running ("" is the default
        server); None when the Hub cannot say (down, or the service lacks the scopes)."""
        try:
            users = await self._get("/users?state=active&limit=10000")
        except (HubUnavailable, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("could not list the Hub's servers: %s", exc)
            return None
        if isinstance(users, dict):  # the paginated form
            users = users.get("items", [])
        running: dict[str, set[str]] = {}
        for user in users or []:
            servers = user.get("servers")
            if servers is None:  # no read:servers scope: nothing can be concluded
                return None
            running[user["name"]] = {
                name for name, server in servers.items() if server.get("ready") or server.get("pending")
            }
        return running


async def release_stopped_servers(registry, identity: HubIdentity, interval: float) -> None:
    """Forever: release the leases of users whose server stopped (culled, logged out, stopped by hand)."""
    while True:
        await asyncio.sleep(interval)
        try:
            running = await identity.running_servers()
            if running is None:
                continue

            def gone(lease, running=running) -> bool:
                # Only leases taken from inside a server name one: a script with a personal API token holds
                # its lease until it unloads, or its process ends, as without a Hub.
                return lease.server is not None and lease.server not in running.get(lease.user, set())

            released = await registry.release(gone, "its Jupyter server stopped")
            if released:
                log.info("released %d lease(s) of users whose server stopped", released)
        except asyncio.CancelledError:
            raise
        except Exception:  # housekeeping must never stop
            log.exception("checking the Hub's servers failed")


class HubMode:
    """What hub mode adds to a host: users from the Hub, their shares, and their leases ended with their servers."""

    def __init__(self, registry, poll_interval: float | None = None):
        self.registry = registry
        self.identity = HubIdentity(HubSettings.from_env())
        self.shares = Shares.from_env()
        #: Every user seen, as the Hub last described them (the share check needs their groups).
        self.users: dict[str, HubUser] = {}
        self.poll_interval = poll_interval or float(os.environ.get("LLM_NB_HUB_POLL_S", "3"))
        #: Where users (not admins) may load model files from by path; none set: anywhere the service reads.
        self.model_dirs = [
            os.path.normpath(os.path.abspath(os.path.expanduser(d)))
            for d in os.environ.get("LLM_NB_HUB_MODEL_DIRS", "").split(os.pathsep)
            if d.strip()
        ]
        #: Whether users (not only admins) may deploy model.py, which runs as the service's account.
        self.user_deploys = os.environ.get("LLM_NB_HUB_USER_DEPLOYS", "0").strip().lower() in ("1", "true", "yes")
        registry.admission = check_share(
            self.users, self.shares, registry.models.values(), registry.budget_bytes, registry.budget_kind
        )
        registry.describe_holders = describe_holders_privately
        self._watch: asyncio.Task | None = None

    async def verify(self, credential: str) -> Principal | None:
        user = await self.identity.user_for_token(credential)
        if user is None:
            return None
        self.users[user.name] = user
        return Principal("user", subject=user.name, user=user)

    def check_model_path(self, requested: str, path: str | None, catalog: dict) -> None:
        """A user's load of a model file by path must come from ``LLM_NB_HUB_MODEL_DIRS`` (when set): the host
        reads it as the service's account. The operator's catalog aliases are always allowed."""
        if not self.model_dirs or not path or requested in catalog:
            return
        # The path as asked for, lexically (the load resolves it): an operator's folder of symlinks to where the
        # weights live is fine; users must not be able to write in these folders.
        where = os.path.normpath(requested) if os.path.isabs(requested) else ""
        if any(where == d or where.startswith(d.rstrip(os.sep) + os.sep) for d in self.model_dirs):
            return
        raise PermissionDenied(
            f"on this JupyterHub's shared host, users load models from the catalog or from "
            f"{os.pathsep.join(self.model_dirs)} (LLM_NB_HUB_MODEL_DIRS), not {requested}: ask an admin to put it there"
        )

    async def start(self, app) -> None:
        self._watch = asyncio.create_task(release_stopped_servers(self.registry, self.identity, self.poll_interval))

    async def stop(self, app) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.identity.close()
