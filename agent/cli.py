"""`yakpanel agent …`: enroll this node, then run the agent."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from yakpanel.logs import configure_logging

if TYPE_CHECKING:
    from agent.runtime import AgentRuntime

DEFAULT_STATE_DIR = Path("/var/lib/yakpanel-agent")

agent_app = typer.Typer(
    name="agent",
    help="The node agent: enroll this server, then keep it connected to the gateway.",
    no_args_is_help=True,
    add_completion=False,
)

StateDirOption = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="YAKPANEL_AGENT_STATE_DIR",
        help="Where the agent keeps its key, certificates, config and ledger.",
    ),
]


def _configure_logging() -> None:
    level = os.environ.get("YAKPANEL_LOG_LEVEL", "INFO").upper()
    fmt = os.environ.get("YAKPANEL_LOG_FORMAT", "console")
    configure_logging(level, fmt)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@agent_app.command()
def enroll(
    gateway: Annotated[
        str, typer.Option("--gateway", help="The gateway's HOST:PORT.", show_default=False)
    ],
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="YAKPANEL_AGENT_TOKEN",
            help="The one-time enrollment token (prefer the environment variable).",
            show_default=False,
        ),
    ],
    ca_file: Annotated[
        Path,
        typer.Option(
            "--ca-file",
            exists=True,
            dir_okay=False,
            readable=True,
            help="PEM file of the CA that signed the gateway's certificate.",
            show_default=False,
        ),
    ],
    connect_gateway: Annotated[
        str | None,
        typer.Option(
            "--connect-gateway",
            help="HOST:PORT of the gateway's mTLS Connect endpoint, if not --gateway.",
            show_default=False,
        ),
    ] = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing enrollment.")] = False,
) -> None:
    """Enroll this node: generate its key, get a certificate, write the state dir."""
    from agent.enroll import EnrollmentError
    from agent.enroll import enroll as enroll_node

    _configure_logging()
    try:
        identity = asyncio.run(
            enroll_node(
                gateway,
                token,
                ca_file.read_bytes(),
                state_dir,
                connect_gateway=connect_gateway,
                force=force,
            )
        )
    except EnrollmentError as exc:
        raise _fail(f"enrollment failed: {exc}") from None
    except OSError as exc:
        raise _fail(f"cannot write the state dir {state_dir}: {exc}") from None
    typer.echo(f"enrolled as {identity.uri}; state in {state_dir}")
    typer.echo(f"start the agent with: yakpanel agent run --state-dir {state_dir}")


@agent_app.command()
def run(state_dir: StateDirOption = DEFAULT_STATE_DIR) -> None:
    """Run the agent until SIGINT or SIGTERM."""
    from agent.runtime import AgentRuntime
    from agent.state import AgentStateError
    from engines.base import EngineLoadError

    _configure_logging()
    try:
        asyncio.run(_run_until_signalled(AgentRuntime(state_dir)))
    except (AgentStateError, EngineLoadError) as exc:
        raise _fail(str(exc)) from None


@agent_app.command()
def telemetry(state_dir: StateDirOption = DEFAULT_STATE_DIR) -> None:
    """Show the metrics settings, the backlog waiting for the gateway and the probe targets."""
    import json
    import time

    from agent.state import AgentStateError, load_config
    from agent.telemetry.probes import parse_targets
    from agent.telemetry.queue import inspect_queue
    from agent.telemetry.service import QUEUE_FILE

    try:
        config = load_config(state_dir / "agent.toml").telemetry
    except AgentStateError as exc:
        raise _fail(str(exc)) from None
    if not config.enabled:
        typer.echo("telemetry: disabled in agent.toml")
    else:
        typer.echo(f"telemetry: collecting every {config.export_interval_s:g} s")
    status = inspect_queue(state_dir / QUEUE_FILE)
    if status is None:
        typer.echo("queue: none yet")
    else:
        age = ""
        if status.oldest_enqueued_at_ms is not None:
            age = f", oldest {time.time() - status.oldest_enqueued_at_ms / 1000:.0f} s old"
        typer.echo(
            f"queue: {status.depth} collection(s), {status.size_bytes} bytes waiting{age} "
            f"(bound {config.queue_max_bytes} bytes, {config.queue_max_entries} entries)"
        )
        typer.echo("dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(status.dropped.items())))
    probes = state_dir / config.probes_file
    try:
        targets = parse_targets(json.loads(probes.read_bytes()))
    except FileNotFoundError:
        typer.echo(f"probes: {probes} does not exist; no site probes")
    except (OSError, ValueError) as exc:  # ProbeConfigError is a ValueError
        raise _fail(f"probes: {probes} is not valid: {exc}") from None
    else:
        typer.echo(f"probes: {len(targets)} targets in {probes}")
        for t in targets:
            typer.echo(f"  {t.site}: {t.url}" + (f" (Host: {t.host})" if t.host else ""))


async def _run_until_signalled(runtime: AgentRuntime) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    try:
        await stop.wait()
    finally:
        await runtime.stop()
