from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from yakpanel.settings import CONFIG_FILE_ENV, Settings

GOOD_KEY = base64.b64encode(os.urandom(32)).decode()


def test_unset_dsns_mean_embedded() -> None:
    s = Settings()
    assert s.embedded_postgres and s.embedded_kafka and s.embedded_clickhouse
    assert s.external_settings_missing() == [
        "YAKPANEL_POSTGRES_DSN",
        "YAKPANEL_KAFKA_BOOTSTRAP",
        "YAKPANEL_CLICKHOUSE_DSN",
    ]


def test_environment_variables_set_dsns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YAKPANEL_POSTGRES_DSN", "postgresql://u@db/yak")
    monkeypatch.setenv("YAKPANEL_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("YAKPANEL_CLICKHOUSE_DSN", "http://ch:8123")
    monkeypatch.setenv("YAKPANEL_API_PORT", "9000")
    s = Settings()
    assert not s.embedded_postgres and not s.embedded_kafka and not s.embedded_clickhouse
    assert s.external_settings_missing() == []
    assert s.api_port == 9000


def test_toml_file_is_read_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "yakpanel.toml"
    config.write_text('api_port = 9100\nkafka_bootstrap = "k1:9092"\nlog_format = "json"\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("YAKPANEL_KAFKA_BOOTSTRAP", "k2:9092")
    s = Settings()
    assert s.api_port == 9100
    assert s.log_format == "json"
    assert s.kafka_bootstrap == "k2:9092"


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match="does not name a readable file"):
        Settings()


def test_unknown_setting_in_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "yakpanel.toml"
    config.write_text("api_prot = 1\n")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    with pytest.raises(ValidationError, match="api_prot"):
        Settings()


def test_production_requires_master_key() -> None:
    with pytest.raises(ValidationError, match="YAKPANEL_MASTER_KEY is required"):
        Settings(env="production")
    with pytest.raises(ValidationError, match="YAKPANEL_INTERNAL_TOKEN is required"):
        Settings(env="production", master_key=GOOD_KEY)
    s = Settings(env="production", master_key=GOOD_KEY, internal_token="x" * 40)
    assert s.master_key is not None


def test_internal_token_must_be_long_and_not_a_placeholder() -> None:
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(internal_token="short")


@pytest.mark.parametrize("value", ["changeme", "secret", "", "  password "])
def test_placeholder_master_keys_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(master_key=value)


def test_master_key_must_be_32_bytes_of_base64() -> None:
    with pytest.raises(ValidationError, match="32 bytes"):
        Settings(master_key=base64.b64encode(b"short").decode())
    with pytest.raises(ValidationError, match="base64"):
        Settings(master_key="not base64 at all!")


def test_master_key_is_not_printed() -> None:
    s = Settings(master_key=GOOD_KEY)
    assert GOOD_KEY not in repr(s)
    assert GOOD_KEY not in str(s.model_dump())


@pytest.mark.parametrize("prefix", ["a b", "x;y", "ü", "a/b"])
def test_topic_prefix_grammar(prefix: str) -> None:
    with pytest.raises(ValidationError):
        Settings(kafka_topic_prefix=prefix)


def test_clickhouse_database_name_grammar() -> None:
    with pytest.raises(ValidationError):
        Settings(clickhouse_database="x`; DROP")


@pytest.mark.parametrize(
    "url", ["http://acme.example.com/dir", "acme.example.com/directory", "https:///dir"]
)
def test_acme_directory_must_be_https(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("YAKPANEL_ACME_DIRECTORY_URL", url)
    with pytest.raises(ValidationError, match="acme_directory_url must be an https"):
        Settings()
    monkeypatch.setenv("YAKPANEL_ACME_DIRECTORY_URL", "https://127.0.0.1:14000/dir")
    assert Settings().acme_directory_url == "https://127.0.0.1:14000/dir"
