"""Who a call comes from, as its verified bearer token says: a subject, roles, workspaces."""

from __future__ import annotations

import contextvars
import enum
import math
import uuid
from dataclasses import dataclass


class Role(enum.Enum):
    """What kind of caller a token stands for; the token's `role`/`roles` claim names them."""

    AGENT = "agent"
    """An AI agent: table queries in its workspaces, memory search."""
    MEMORY = "memory"
    """The memory system: sync streams and memory records of its workspaces."""
    JOB = "job"
    """A maintenance job: backups, jobs, schedules, the status view."""
    ADMIN = "admin"
    """An operator: everything, in the workspaces its token grants."""


@dataclass(frozen=True)
class Principal:
    """A caller whose token verified."""

    subject: str
    """The token's `sub`: who the caller is (logs, per-caller limits)."""
    roles: frozenset[Role]
    """The roles the token grants."""
    workspaces: frozenset[uuid.UUID]
    """The workspaces the token grants, unless `all_workspaces`."""
    all_workspaces: bool
    """The token's `workspaces` claim is ["*"]: every workspace, and all-workspace operations."""
    not_before: float = -math.inf
    """Unix time (with the leeway already applied) before which the token is not valid yet."""
    expires_at: float = math.inf
    """Unix time (with the leeway already applied) at which the token stops being valid."""

    def has_role(self, allowed: frozenset[Role]) -> bool:
        return not self.roles.isdisjoint(allowed)

    def grants(self, workspace: uuid.UUID) -> bool:
        return self.all_workspaces or workspace in self.workspaces


DEVELOPMENT = Principal(
    subject="development",
    roles=frozenset(Role),
    workspaces=frozenset(),
    all_workspaces=True,
)
"""Every call's principal when authentication is switched off (dev_disable_auth)."""

current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)
"""The principal of the call being served (set by the authorization interceptor)."""
