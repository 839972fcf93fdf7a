"""ClickHouse client construction. `chdb:///path` is the in-process engine; an
`http(s)://` DSN is a ClickHouse server. Both give the same clickhouse-connect client."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ClickHouseTarget:
    dsn: str
    database: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb:")

    def client(self) -> Any:
        """A new clickhouse-connect client on the server database (created if missing).

        chDB opens one data path per process; every client of this target shares it.
        """
        import clickhouse_connect

        with self._lock:
            if self.embedded:
                path = self.dsn.removeprefix("chdb://")
                if path and path != "memory":
                    Path(path).mkdir(parents=True, exist_ok=True)
            client = clickhouse_connect.get_client(dsn=self.dsn)
            client.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
            client.database = self.database
            return client


def embedded_dsn(state_dir: Path) -> str:
    return f"chdb://{(state_dir / 'clickhouse').resolve()}"
