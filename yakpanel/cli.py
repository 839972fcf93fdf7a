"""The `yakpanel` command: one group, thin commands that build a service and run it."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from yakpanel.logs import configure_logging
from yakpanel.settings import Settings

app = typer.Typer(
    name="yakpanel",
    help="YakPanel: hosting control panel with built-in observability.",
    no_args_is_help=True,
    add_completion=False,
)

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Where embedded data lives (default: $YAKPANEL_STATE_DIR)."),
]


def _settings(state_dir: Path | None = None) -> Settings:
    try:
        settings = Settings(state_dir=state_dir) if state_dir is not None else Settings()
    except (ValidationError, ValueError) as exc:
        typer.secho(f"configuration error:\n{exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _say(line: str) -> None:
    print(line, flush=True)


@app.command()
def up(state_dir: StateDirOption = None) -> None:
    """Start the embedded stack and every service in this process. Ctrl-C stops it all."""
    from yakpanel.embedded import EmbeddedUnavailable
    from yakpanel.supervisor import StateDirBusy, Supervisor, run_until_signalled

    settings = _settings(state_dir)
    _say(f"state dir: {settings.state_dir.expanduser().resolve()}")
    try:
        asyncio.run(run_until_signalled(Supervisor(settings, out=_say)))
    except (StateDirBusy, EmbeddedUnavailable) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="The service to run, e.g. `api`.")],
) -> None:
    """Run one service alone against external PostgreSQL, Kafka and ClickHouse."""
    from yakpanel.services import SERVICE_FACTORIES, SERVICE_NEEDS
    from yakpanel.supervisor import serve_one

    settings = _settings()
    if service not in SERVICE_FACTORIES:
        typer.secho(
            f"unknown service {service!r}; known: {', '.join(SERVICE_FACTORIES)}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    missing = settings.external_settings_missing(SERVICE_NEEDS[service])
    if missing:
        typer.secho(
            f"`serve {service}` runs against external services; set {', '.join(missing)} "
            "(or use `yakpanel up` for the embedded stack)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    serve_one(settings, service, out=_say)


@app.command()
def migrate(state_dir: StateDirOption = None) -> None:
    """Apply PostgreSQL and ClickHouse migrations (idempotent, serialized by a lock)."""
    from yakpanel.clickhouse import ClickHouseTarget, embedded_dsn
    from yakpanel.embedded import EmbeddedPostgres
    from yakpanel.migrations import MigrationError, migrate_all
    from yakpanel.supervisor import StateDirBusy, StateDirLock

    settings = _settings(state_dir)
    root = settings.state_dir.expanduser().resolve()
    lock: StateDirLock | None = None
    postgres: EmbeddedPostgres | None = None
    if settings.embedded_postgres or settings.embedded_clickhouse:
        lock = StateDirLock(root)
        try:
            lock.acquire()
        except StateDirBusy as exc:
            typer.secho(f"{exc} (a running `up` already migrated at start)", err=True)
            raise typer.Exit(1) from None
    try:
        if settings.postgres_dsn is None:
            postgres = EmbeddedPostgres(root / "postgres")
            dsn = postgres.start()
        else:
            dsn = settings.postgres_dsn
        target = ClickHouseTarget(
            settings.clickhouse_dsn or embedded_dsn(root), settings.clickhouse_database
        )
        client = target.client()
        try:
            report = migrate_all(dsn, client, settings.clickhouse_database)
        finally:
            client.close()
    except MigrationError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    finally:
        if postgres is not None:
            postgres.stop()
        if lock is not None:
            lock.release()
    for m in report.postgres + report.clickhouse:
        _say(f"applied {m.label}")
    if not report.changed:
        _say("schema is up to date")
    if settings.kafka_bootstrap is not None:
        # The production shape has no supervisor: the migrate job also owns the topics.
        from yakpanel.topics import ensure_topics

        created = asyncio.run(
            ensure_topics(
                settings.kafka_bootstrap,
                settings.kafka_topic_prefix,
                replication_factor=settings.kafka_replication_factor,
            )
        )
        for topic in created:
            _say(f"created topic {topic}")


@app.command()
def topics() -> None:
    """List the Kafka topic catalogue."""
    from yakpanel.topics import CATALOGUE

    prefix = Settings().kafka_topic_prefix
    for spec in CATALOGUE:
        _say(
            f"{spec.full_name(prefix)}\tpartitions={spec.partitions}\t"
            f"retention_ms={spec.retention_ms}\tkey={spec.key}"
        )


@app.command()
def keygen() -> None:
    """Print a new random master key for YAKPANEL_MASTER_KEY."""
    _say(base64.b64encode(os.urandom(32)).decode())


def _mount_agent() -> None:
    # The agent is part of the same distribution; its CLI is the `agent` group.
    from agent.cli import agent_app

    app.add_typer(agent_app, name="agent", help="Enroll and run the node agent.")


_mount_agent()


def _mount_rules() -> None:
    from alerting.cli import rules_app

    app.add_typer(rules_app, name="rules", help="Check and unit-test alerting rule files.")


_mount_rules()


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
