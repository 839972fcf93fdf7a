"""Typed settings from ``YAKPANEL_*`` environment variables and an optional TOML file.

A DSN left unset means "embedded": `yakpanel up` starts PostgreSQL, the Kafka-protocol
broker and chDB itself. A DSN that is set points at an external server; both paths go
through the same code.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "YAKPANEL_CONFIG_FILE"

# Values people paste from examples; refused as secrets outside development.
_PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "password", "admin", "example", "xxx", "todo"}
)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "yakpanel"


class Settings(BaseSettings):
    """Every setting of a YakPanel process. See the configuration table in the README."""

    model_config = SettingsConfigDict(env_prefix="YAKPANEL_", extra="forbid")

    env: Literal["development", "production"] = "development"
    state_dir: Path = Field(default_factory=default_state_dir)

    postgres_dsn: str | None = None
    kafka_bootstrap: str | None = None
    kafka_topic_prefix: str = ""
    kafka_replication_factor: int = Field(default=1, ge=1, le=7)
    embedded_kafka_port: int = Field(default=19092, ge=1, le=65535)
    clickhouse_dsn: str | None = None
    clickhouse_database: str = Field(default="yakpanel", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None

    master_key: SecretStr | None = None
    internal_token: SecretStr | None = None

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=7443, ge=0, le=65535)
    gateway_enroll_port: int = Field(default=7444, ge=0, le=65535)
    gateway_hostnames: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1"])
    gateway_public_address: str | None = None
    gateway_public_enroll_address: str | None = None
    gateway_id: str | None = None
    controlplane_url: str | None = None
    heartbeat_interval_ms: int = Field(default=5000, ge=100, le=600_000)
    presence_refresh_s: float = Field(default=15.0, gt=0, le=3600)
    gateway_queue_per_agent: int = Field(default=1000, ge=1, le=100_000)
    gateway_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # OTLP metrics (gateway `MetricsService/Export`), each limit per tenant.
    otlp_max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    otlp_max_datapoints: int = Field(default=50_000, ge=1, le=10_000_000)
    otlp_max_new_series_per_hour: int = Field(default=100_000, ge=1, le=100_000_000)
    # Aggregator (yak.metrics.v1 -> ClickHouse): batch per partition, bound on decoded rows
    # waiting for ClickHouse, and how late/early a sample may be against gateway time.
    aggregator_max_records: int = Field(default=1000, ge=1, le=1_000_000)
    aggregator_max_wait_s: float = Field(default=2.0, gt=0, le=300)
    aggregator_max_pending_rows: int = Field(default=1_000_000, ge=1000, le=100_000_000)
    aggregator_late_window_s: int = Field(default=600, ge=0, le=7 * 86400)
    aggregator_future_window_s: int = Field(default=600, ge=0, le=86400)
    aggregator_heartbeat_file: Path | None = None
    alerting_tick_s: float = Field(default=1.0, gt=0, le=60)
    alerting_default_interval_s: float = Field(default=60.0, gt=0, le=86400)
    # Streaming evaluation (docs/alerting.md): rules also read yak.metrics.v1 and evaluate
    # on ingest from a per-tenant hot window of at most this many samples.
    alerting_heartbeat_file: Path | None = None
    alerting_stream: bool = True
    alerting_stream_max_samples: int = Field(default=200_000, ge=1000, le=50_000_000)
    alerting_stream_max_window_s: int = Field(default=3600, ge=60, le=86400)
    alerting_stream_debounce_ms: float = Field(default=25.0, ge=0, le=10_000)

    worker_heartbeat_file: Path | None = None
    # Site certificates (ACME). `acme_ca_bundle`: a PEM file of the CA that serves the
    # directory, for a private ACME server (e.g. Pebble); unset trusts the system CAs.
    acme_directory_url: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_ca_bundle: Path | None = None
    acme_email: str | None = None
    certificate_renew_before_days: int = Field(default=30, ge=1, le=89)
    certificate_renewal_interval_s: float = Field(default=3600.0, gt=0, le=86400)
    certificate_renewal_retry_s: float = Field(default=6 * 3600.0, ge=0, le=7 * 86400)

    readiness_timeout_s: float = Field(default=2.0, gt=0, le=30)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ValueError(f"{CONFIG_FILE_ENV}={config_file} does not name a readable file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("kafka_topic_prefix")
    @classmethod
    def _topic_prefix_grammar(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(value) <= allowed or len(value) > 100:
            raise ValueError("kafka_topic_prefix may hold only letters, digits, '.', '_', '-'")
        return value

    @field_validator("acme_directory_url")
    @classmethod
    def _acme_directory_is_https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(
                "acme_directory_url must be an https:// URL (ACME servers speak HTTPS only), "
                "e.g. https://acme-v02.api.letsencrypt.org/directory"
            )
        return value

    @field_validator("internal_token")
    @classmethod
    def _internal_token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            if raw.strip().lower() in _PLACEHOLDER_SECRETS or len(raw) < 32:
                raise ValueError("internal_token must be at least 32 random characters")
        return value

    @field_validator("master_key")
    @classmethod
    def _master_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value()
        if raw.strip().lower() in _PLACEHOLDER_SECRETS:
            raise ValueError("master_key is a placeholder; generate one with `yakpanel keygen`")
        try:
            decoded = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("master_key must be base64 (32 bytes); see `yakpanel keygen`") from exc
        if len(decoded) != 32:
            raise ValueError(f"master_key must decode to 32 bytes, got {len(decoded)}")
        return value

    @model_validator(mode="after")
    def _production_needs_secrets(self) -> Settings:
        if self.env == "production" and self.master_key is None:
            raise ValueError("YAKPANEL_MASTER_KEY is required when YAKPANEL_ENV=production")
        if self.env == "production" and self.internal_token is None:
            raise ValueError("YAKPANEL_INTERNAL_TOKEN is required when YAKPANEL_ENV=production")
        return self

    @property
    def controlplane_base_url(self) -> str:
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host  # noqa: S104
        return self.controlplane_url or f"http://{host}:{self.api_port}"

    @property
    def gateway_address(self) -> str:
        return self.gateway_public_address or f"{self.gateway_host}:{self.gateway_port}"

    @property
    def gateway_enroll_address(self) -> str:
        return self.gateway_public_enroll_address or (
            f"{self.gateway_host}:{self.gateway_enroll_port}"
        )

    @property
    def embedded_postgres(self) -> bool:
        return self.postgres_dsn is None

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka_bootstrap is None

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn is None

    def external_settings_missing(
        self, needs: frozenset[str] = frozenset({"postgres", "kafka", "clickhouse"})
    ) -> list[str]:
        """Names of the DSN settings a standalone (`serve`) process needs but lacks;
        `needs` names the dependencies of the service (all three by default)."""
        missing = []
        if "postgres" in needs and self.postgres_dsn is None:
            missing.append("YAKPANEL_POSTGRES_DSN")
        if "kafka" in needs and self.kafka_bootstrap is None:
            missing.append("YAKPANEL_KAFKA_BOOTSTRAP")
        if "clickhouse" in needs and self.clickhouse_dsn is None:
            missing.append("YAKPANEL_CLICKHOUSE_DSN")
        return missing
