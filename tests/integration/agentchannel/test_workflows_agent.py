"""Workflows end to end: start → driver → signed commands → real agent → results → driver.

The agent loads `tests.support.workflow_engine:WorkflowEngine`, whose `wf.step` journals
one line per idempotency key, so each test reads from the journal what really ran on the
node, in which order and how often.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from agent.ledger import Ledger
from agent.runtime import AgentRuntime
from controlplane.db import SYSTEM, Database, UnitOfWork
from controlplane.workflows import (
    RetryPolicy,
    StepSpec,
    WorkflowOutcome,
    on_workflow_finished,
    start_workflow,
)

from .conftest import Channel, enroll_agent, eventually, wait_presence

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

REPO = Path(__file__).resolve().parents[3]
FINISHED = ("succeeded", "failed", "compensated")
SECRET = "wf-Secret-" + uuid.uuid4().hex  # unique: any copy of it in PostgreSQL is a leak


def write_wf_agent_config(state_dir: Path) -> None:
    """The node approves `wf.step` from the workflow test engine."""
    (state_dir / "agent.toml").write_text(
        'capabilities = ["wf.step"]\nengines = ["tests.support.workflow_engine:WorkflowEngine"]\n'
    )


async def enroll_wf_agent(channel: Channel, name: str, state_dir: Path) -> str:
    server_id = await enroll_agent(channel, name, state_dir)
    write_wf_agent_config(state_dir)
    return server_id


@pytest.fixture
async def db(channel: Channel) -> AsyncIterator[Database]:
    database = Database(channel.stack.postgres_dsn, channel.stack.clock, max_size=2)
    await database.open()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def node(channel: Channel, tmp_path: Path) -> AsyncIterator[str]:
    """An enrolled agent running in this process; yields its server id."""
    state = tmp_path / "agent"
    server_id = await enroll_wf_agent(channel, "wf-node", state)
    runtime = AgentRuntime(state, max_backoff_s=1.0)
    await runtime.start()
    try:
        await asyncio.wait_for(runtime.wait_connected(), 20)
        yield server_id
    finally:
        await runtime.stop()


async def start(
    db: Database, channel: Channel, kind: str, steps: list[StepSpec]
) -> tuple[uuid.UUID, uuid.UUID]:
    tenant_id = uuid.UUID(channel.tenant.id)
    subject = uuid.uuid4()
    async with db.unit_of_work(SYSTEM, tenant_id) as uow:
        workflow_id = await start_workflow(uow, tenant_id, kind, "site", subject, steps)
    return workflow_id, subject


async def get_workflow(channel: Channel, workflow_id: uuid.UUID) -> dict[str, Any]:
    r = await channel.tenant.owner.get(f"/v1/tenants/{channel.tenant.id}/workflows/{workflow_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def wait_finished(
    channel: Channel, workflow_id: uuid.UUID, timeout_s: float = 60
) -> dict[str, Any]:
    body: dict[str, Any] = await eventually(
        lambda: get_workflow(channel, workflow_id), lambda w: w["state"] in FINISHED, timeout_s
    )
    return body


def journal(path: Path) -> list[tuple[str, str, str]]:
    """(line, idempotency key, secret digest) per journal entry, in the order written."""
    if not path.exists():
        return []
    return [tuple(row.split("\t")) for row in path.read_text().splitlines()]  # type: ignore[misc]


def step(name: str, server_id: str, file: Path, **payload: Any) -> StepSpec:
    compensate = payload.pop("compensate", True)
    retry = payload.pop("retry", RetryPolicy(max_attempts=3, base_delay_s=0.2, max_delay_s=2))
    return StepSpec(
        name=name,
        server_id=uuid.UUID(server_id),
        command_type="wf.step",
        payload={"file": str(file), "line": name, **payload},
        compensation=("wf.step", {"file": str(file), "line": f"undo:{name}"})
        if compensate
        else None,
        retry=retry,
        timeout_s=30,
    )


def workflow_events(dsn: str, workflow_id: uuid.UUID) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(
            """SELECT payload FROM outbox WHERE aggregate_type = 'workflow'
               AND aggregate_id = %s ORDER BY id""",
            (str(workflow_id),),
        ).fetchall()
    return [r["payload"] for r in rows]


async def test_a_failing_third_step_compensates_steps_one_and_two_in_reverse_order(
    channel: Channel, node: str, db: Database, tmp_path: Path
) -> None:
    outcomes: list[WorkflowOutcome] = []
    kind = f"test.compensate.{uuid.uuid4().hex[:8]}"

    async def remember(uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
        outcomes.append(outcome)

    on_workflow_finished(kind, remember)
    file = tmp_path / "journal"
    workflow_id, subject = await start(
        db,
        channel,
        kind,
        [
            step("one", node, file),
            step("two", node, file),
            step("three", node, file, fail=True),
            step("four", node, file),
        ],
    )

    done = await wait_finished(channel, workflow_id)

    assert done["state"] == "compensated", done
    assert [line for line, _, _ in journal(file)] == ["one", "two", "undo:two", "undo:one"]
    steps = {s["name"]: s for s in done["steps"]}
    assert [s["state"] for s in done["steps"]] == [
        "compensated",
        "compensated",
        "failed",
        "pending",
    ]
    assert steps["three"]["attempts"] == 1, "a non-retryable failure is not retried"
    assert steps["three"]["error_code"] == "refused"
    assert steps["four"]["command_ids"] == [], "nothing after the failed step runs"
    assert done["error"] and "step 3 (three) failed" in done["error"]
    # Each step ran one command and one compensation, with keys naming workflow/step/try.
    keys = {line: key for line, key, _ in journal(file)}
    assert keys["one"] == f"wf:{workflow_id}:0:1"
    assert keys["undo:one"] == f"wf:{workflow_id}:0:undo:1"
    assert len(steps["one"]["command_ids"]) == 2

    # The hook saw the outcome, with the outputs of the steps that ran.
    assert [(o.workflow_id, o.state, o.subject_id) for o in outcomes] == [
        (workflow_id, "compensated", subject)
    ]
    assert set(outcomes[0].outputs) == {"one", "two"}

    # Progress is visible through the API list too.
    r = await channel.tenant.owner.get(
        f"/v1/tenants/{channel.tenant.id}/workflows",
        params={"subject_type": "site", "subject_id": str(subject)},
    )
    assert r.status_code == 200, r.text
    assert [w["id"] for w in r.json()["items"]] == [str(workflow_id)]

    # Every transition was published as an event and audited.
    types = [e["type"] for e in workflow_events(channel.stack.postgres_dsn, workflow_id)]
    assert types[0] == "workflow.started"
    assert types[-1] == "workflow.compensated"
    assert types.count("workflow.step.succeeded") == 2
    assert types.count("workflow.step.failed") == 1
    assert types.count("workflow.step.compensated") == 2
    compensated = [
        e["data"]["name"]
        for e in workflow_events(channel.stack.postgres_dsn, workflow_id)
        if e["type"] == "workflow.step.compensated"
    ]
    assert compensated == ["two", "one"]
    r = await channel.tenant.owner.get(
        f"/v1/tenants/{channel.tenant.id}/audit", params={"action": "workflow.compensated"}
    )
    assert r.status_code == 200, r.text
    assert [e["resource_id"] for e in r.json()["items"]] == [str(workflow_id)]


async def test_a_retryable_failure_is_retried_with_growing_backoff_until_it_succeeds(
    channel: Channel, node: str, db: Database, tmp_path: Path
) -> None:
    driver = channel.worker.workflows
    assert driver is not None
    driver.jitter = lambda cap: cap  # the top of each jitter window: delays are exact
    file = tmp_path / "journal"
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.4, max_delay_s=10)
    workflow_id, _ = await start(
        db, channel, "test.retry", [step("flaky", node, file, fail_times=2, retry=policy)]
    )

    done = await wait_finished(channel, workflow_id)

    assert done["state"] == "succeeded", done
    [flaky] = done["steps"]
    assert flaky["attempts"] == 3
    assert len(flaky["command_ids"]) == 3
    assert flaky["output"]["line"] == "flaky"
    assert done["progress"] == 100
    assert [key for _, key, _ in journal(file)] == [f"wf:{workflow_id}:0:3"]
    retries = [
        e["data"]
        for e in workflow_events(channel.stack.postgres_dsn, workflow_id)
        if e["type"] == "workflow.step.retry_scheduled"
    ]
    assert [(r["attempt"], r["error_code"], r["delay_s"]) for r in retries] == [
        (1, "flaky", 0.4),
        (2, "flaky", 0.8),
    ]
    # Each retry really waited at least its delay after the failed attempt was issued.
    issued: list[datetime] = []
    for command_id in flaky["command_ids"]:
        command = await channel.get_command(command_id)
        issued.append(datetime.fromisoformat(command["issued_at"]))
    finished_first = datetime.fromisoformat(
        (await channel.get_command(flaky["command_ids"][0]))["finished_at"]
    )
    assert (issued[1] - finished_first).total_seconds() >= 0.4
    assert (issued[2] - issued[1]).total_seconds() >= 0.8


class AgentProcess:
    """`yakpanel agent run` in its own process, so that it can be killed like on a node."""

    def __init__(self, state_dir: Path, log_path: Path) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "yakpanel",
                    "agent",
                    "run",
                    "--state-dir",
                    str(self.state_dir),
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path / "agent", tmp_path / "agent.log")
    yield process
    process.stop()


async def test_a_step_redelivered_after_an_agent_restart_runs_once(
    channel: Channel, agent_process: AgentProcess, db: Database, tmp_path: Path
) -> None:
    server_id = await enroll_wf_agent(channel, "wf-crashy", agent_process.state_dir)
    agent_process.start()
    await wait_presence(channel, server_id, "online")
    file = tmp_path / "journal"
    workflow_id, _ = await start(
        db,
        channel,
        "test.redelivery",
        [step("slow", server_id, file, hold_seconds=3), step("after", server_id, file)],
    )

    # The step's effect happened and the agent reports progress; then the node dies.
    running = await eventually(
        lambda: get_workflow(channel, workflow_id),
        lambda w: w["steps"][0]["progress"] > 0 and bool(journal(file)),
        30,
    )
    assert running["state"] == "running"
    assert running["steps"][0]["state"] == "running"
    assert 0 < running["progress"] < 100
    agent_process.kill()

    agent_process.start()
    done = await wait_finished(channel, workflow_id)

    log_tail = agent_process.log_path.read_text()[-2000:]
    assert done["state"] == "succeeded", (done, log_tail)
    assert [line for line, _, _ in journal(file)] == ["slow", "after"]
    slow = done["steps"][0]
    assert slow["attempts"] == 1, "the redelivered command is the same attempt, not a retry"
    assert len(slow["command_ids"]) == 1
    agent_process.stop()
    with Ledger(agent_process.state_dir / "ledger.sqlite3") as ledger:
        entry = ledger.get(f"wf:{workflow_id}:0:1")
    assert entry is not None
    assert entry.attempts == 2, "the agent resumed the interrupted step after its restart"


def _tables_holding(dsn: str, needle: str) -> list[str]:
    """Every public table with a row whose text or bytes contain `needle`."""
    hexed = needle.encode().hex()
    with psycopg.connect(dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            ).fetchall()
        ]
        found = []
        for table in tables:
            hit = conn.execute(
                psycopg.sql.SQL(
                    "SELECT 1 FROM {} t WHERE strpos(t::text, %s) > 0 OR strpos(t::text, %s) > 0"
                    " LIMIT 1"
                ).format(psycopg.sql.Identifier(table)),
                (needle, hexed),
            ).fetchone()
            if hit:
                found.append(table)
    return found


async def test_step_secrets_reach_the_agent_but_never_postgresql_in_the_clear(
    channel: Channel, node: str, db: Database, tmp_path: Path
) -> None:
    file = tmp_path / "journal"
    secret_step = StepSpec(
        name="with-secret",
        server_id=uuid.UUID(node),
        command_type="wf.step",
        payload={"file": str(file), "line": "with-secret", "secret": {"$secret": SECRET}},
        compensation=(
            "wf.step",
            {"file": str(file), "line": "undo:with-secret", "secret": {"$secret": SECRET}},
        ),
        retry=RetryPolicy(max_attempts=1),
    )
    workflow_id, _ = await start(
        db, channel, "test.secret", [secret_step, step("boom", node, file, fail=True)]
    )

    done = await wait_finished(channel, workflow_id)

    assert done["state"] == "compensated", done
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    assert [(line, d) for line, _, d in journal(file)] == [
        ("with-secret", digest),
        ("undo:with-secret", digest),
    ], "the step and its compensation both received the secret opened"
    assert _tables_holding(channel.stack.postgres_dsn, SECRET) == []
    # Sanity of the scan itself: a value that is stored is found.
    assert "workflows" in _tables_holding(channel.stack.postgres_dsn, str(workflow_id))
    with psycopg.connect(channel.stack.postgres_dsn) as conn:
        [(payload,)] = conn.execute(
            "SELECT payload FROM workflow_steps WHERE workflow_id = %s AND index = 0",
            (workflow_id,),
        ).fetchall()
    assert set(payload["secret"]) == {"$boxed"}
    assert json.dumps(payload).count(SECRET) == 0
