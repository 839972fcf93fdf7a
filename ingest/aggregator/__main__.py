"""`python -m ingest.aggregator`: the aggregator alone in this process.

It needs Kafka and ClickHouse only (YAKPANEL_KAFKA_BOOTSTRAP, YAKPANEL_CLICKHOUSE_DSN);
`--migrate` applies the ClickHouse migrations first, for a ClickHouse (or chDB path) that
no `yakpanel migrate` job prepares.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer
from pydantic import ValidationError

from ingest.aggregator.config import AggregatorConfig
from ingest.aggregator.service import Aggregator
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.logs import configure_logging
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator
from yakpanel.settings import Settings

app = typer.Typer(add_completion=False)


async def _serve(aggregator: Aggregator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await aggregator.start()
    try:
        await stop.wait()
    finally:
        await aggregator.stop()


@app.command()
def main(
    migrate: Annotated[bool, typer.Option(help="Apply the ClickHouse migrations first.")] = False,
    max_records: Annotated[int, typer.Option(min=1, help="Records per partition batch.")] = 1000,
    max_wait_s: Annotated[float, typer.Option(min=0.01, help="Seconds a batch may wait.")] = 2.0,
    session_timeout_ms: Annotated[
        int,
        typer.Option(
            min=1000, help="Group session timeout; a dead process's partitions move after it."
        ),
    ] = 10_000,
) -> None:
    """Consume yak.metrics.v1 and write series, samples and rollups to ClickHouse."""
    try:
        settings = Settings()
    except (ValidationError, ValueError) as exc:
        typer.secho(f"configuration error:\n{exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if settings.kafka_bootstrap is None or settings.clickhouse_dsn is None:
        typer.secho(
            "set YAKPANEL_KAFKA_BOOTSTRAP and YAKPANEL_CLICKHOUSE_DSN "
            "(or run the whole stack with `yakpanel up`)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_format)
    target = ClickHouseTarget(settings.clickhouse_dsn, settings.clickhouse_database)
    if migrate:
        client = target.client()
        try:
            migrations = [m for s in CLICKHOUSE_SOURCES for m in s.load()]
            ClickHouseMigrator(client, settings.clickhouse_database).apply(migrations)
        finally:
            client.close()
    config = AggregatorConfig(
        max_records=max_records,
        max_wait_s=max_wait_s,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(100, session_timeout_ms // 10),
    )
    aggregator = Aggregator(
        settings.kafka_bootstrap,
        settings.kafka_topic_prefix,
        target.client,
        settings.clickhouse_database,
        config,
    )
    asyncio.run(_serve(aggregator))


if __name__ == "__main__":
    app()
