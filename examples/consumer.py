"""An agent-style consumer of the RaptorFlow Data client, kept passing `mypy --strict`.

Run against a server whose exposed tables include `campaigns` (id, name,
status, budget, tags, settings, created_at; unique on workspace_id and name)
and `campaign_events` (kind, at)::

    RAPTORFLOW_DATA_TOKEN=<jwt> python examples/consumer.py --target localhost:50051 \
        --workspace <uuid>

The token needs the agent (or admin) role and the workspace; `make run` prints one.
"""

import argparse
import asyncio
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from raptorflow.data.client import (
    AlreadyExists,
    ClientConfig,
    DataClient,
    DataError,
    InvalidArgument,
    Row,
    Workspace,
    any_of,
    eq,
    is_null,
)


def describe(row: Row) -> str:
    """One line per campaign; values are typed, so narrowing comes before use."""
    name = row.get("name")
    budget = row.get("budget")
    label = name if isinstance(name, str) else "(unnamed)"
    amount = f"{budget:.2f}" if isinstance(budget, Decimal) else "-"
    return f"{row.get('id')}  {label:<30} {amount:>12}"


async def report(workspace: Workspace) -> None:
    campaigns = workspace.table("campaigns")

    newest = await (
        campaigns.select("id", "name", "budget")
        .eq("status", "active")
        .order("created_at", desc=True)
        .limit(20)
        .execute()
    )
    for row in newest.data:
        print(describe(row))

    active = await campaigns.count().eq("status", "active").execute()
    print(f"{active} active campaigns")

    # Nested conditions go through where() and the module-level constructors.
    idle = campaigns.select("id", "name").where(any_of(eq("status", "paused"), is_null("status")))
    async for row in idle.stream():
        print("idle:", describe(row))


async def launch(workspace: Workspace, name: str) -> None:
    campaigns = workspace.table("campaigns")
    try:
        created = await campaigns.insert(
            {
                "name": name,
                "status": "active",
                "budget": Decimal("1200.50"),
                "tags": ["email", "q2"],
                "settings": {"channel": "email", "daily_cap": 500},
            },
            returning=("id", "created_at"),
        ).execute()
    except AlreadyExists as err:
        print(f"{name!r} exists already ({err.reason})")
        return
    except InvalidArgument as err:
        for violation in err.field_violations:
            print(f"rejected {violation.field}: {violation.description}")
        return
    print("created", created.data[0]["id"])

    # Archive stale campaigns and record why, all or nothing.
    cutoff = datetime.now(UTC) - timedelta(days=90)
    archived, _ = await workspace.batch(
        campaigns.update({"status": "archived"}).lt("created_at", cutoff).returning("id"),
        workspace.table("campaign_events").insert(
            {"kind": "archive_sweep", "at": datetime.now(UTC)}, returning=()
        ),
    )
    print(f"archived {archived.count} campaigns")


async def main(target: str, workspace_id: str) -> None:
    config = ClientConfig(
        target,
        # A function, so a token refreshed in the environment is picked up per call.
        token=lambda: os.environ["RAPTORFLOW_DATA_TOKEN"],
        timeout=5.0,
        metadata={"x-agent": "campaign-reporter"},
    )
    async with DataClient(config) as client:
        tables = await client.describe_tables()
        print("tables:", ", ".join(table.name for table in tables))
        workspace = client.workspace(workspace_id)
        try:
            await launch(workspace, "Spring launch")
            await report(workspace)
        except DataError as err:
            # str(err) carries the status code, reason and field violations.
            print(f"failed: {err}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--workspace", required=True, help="a workspace id (UUID)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.target, arguments.workspace))
