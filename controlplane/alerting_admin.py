"""Use cases of the alerting API: rule groups, notification config, silences, and the
read side of alerts, their history and delivery attempts.

Everything runs in a unit of work (tenant context, row-level security), with the audit
entry and the domain event of every write in the same transaction. Validation is the
alerting package's own (`parse_rule_groups`, `check_rule_limit`, `parse_config`,
`Silences.add`), so the API accepts exactly what the alerting service can run. The rows
are those of `controlplane/schema/0006_alerting.sql`, written in the shapes
`alerting.store.AlertStore` reads: receiver URLs are sealed under the master key with
`alerting.store.receiver_context`, and no response, audit entry or event ever holds one
in the clear.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import yaml
from psycopg.types.json import Jsonb
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from alerting.matchers import Matcher, MatcherError, parse_matchers
from alerting.receivers import Sealer, SecretURL
from alerting.routing import ConfigError, NotificationConfig, parse_config
from alerting.rules import (
    RuleError,
    RuleGroup,
    RuleLimitExceeded,
    check_rule_limit,
    count_rules,
    parse_rule_groups,
    rules_to_dict,
)
from alerting.silences import Silence, SilenceError, Silences, SilenceState
from alerting.state import GroupState, encode_value
from alerting.store import SEALED, receiver_context
from controlplane.access.policy import QUOTAS, Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.db import Database, UnitOfWork
from controlplane.problems import Problem
from yakpanel.ids import new_id

READ, WRITE = "alerts:read", "alerts:write"
MAX_TEXT = 1_000_000  # characters of YAML in one request
RULE_QUOTA = "alert_rules"

# --- response and request models ---------------------------------------------------------


class RuleGroupOut(BaseModel):
    name: str
    rule_count: int
    spec: dict[str, Any] = Field(
        description="the group in the Prometheus rule-file shape (as `rules_to_dict` gives it)"
    )
    updated_at: datetime


class RuleGroupList(BaseModel):
    items: list[RuleGroupOut]
    rule_count: int = Field(description="rules of the tenant, counted against max_alert_rules")
    rule_limit: int = Field(description="the plan's max_alert_rules")


class NotificationConfigOut(BaseModel):
    config: dict[str, Any] | None = Field(
        description="route tree, receivers (URLs redacted) and inhibit rules; null if unset"
    )
    updated_at: datetime | None


class MatcherIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=200)
    value: str = Field(max_length=2000)
    isRegex: bool = False
    isEqual: bool = True


class SilenceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    matchers: list[str | MatcherIn] = Field(
        min_length=1,
        max_length=50,
        description='`name="value"` strings (`=`, `!=`, `=~`, `!~`) or Alertmanager objects',
    )
    starts_at: AwareDatetime | None = Field(None, description="default: now")
    ends_at: AwareDatetime
    comment: str = Field(min_length=1, max_length=2000)


class MatcherOut(BaseModel):
    name: str
    value: str
    isRegex: bool
    isEqual: bool


class SilenceOut(BaseModel):
    id: str
    matchers: list[MatcherOut]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    updated_at: datetime
    state: Literal["pending", "active", "expired"]


class SilencePage(BaseModel):
    items: list[SilenceOut]
    next_cursor: str | None


class AlertOut(BaseModel):
    fingerprint: str
    group: str
    rule_id: str
    alertname: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: Literal["pending", "firing", "resolved", "inactive"]
    value: float | str = Field(description='the sample value; "NaN", "+Inf", "-Inf" as text')
    active_since: datetime
    last_active_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    silenced_by: list[str] = Field(description="ids of the active silences muting the alert")


class RuleHealthOut(BaseModel):
    group: str
    rule_id: str
    health: Literal["unknown", "ok", "error"]
    last_error: str | None
    last_evaluated_at: datetime | None


class AlertList(BaseModel):
    items: list[AlertOut]
    rules: list[RuleHealthOut]


class TransitionOut(BaseModel):
    key: str
    fingerprint: str
    rule_id: str
    group: str
    alertname: str
    labels: dict[str, str]
    annotations: dict[str, str]
    from_state: str
    to_state: str
    at: datetime
    value: float | str
    active_since: datetime
    fired_at: datetime | None
    resolved_at: datetime | None


class TransitionPage(BaseModel):
    items: list[TransitionOut]
    next_cursor: str | None


class AttemptOut(BaseModel):
    notification_id: str
    attempt: int
    at: datetime
    group_key: str
    receiver: str
    integration: int
    target: str = Field(description="the receiver URL, redacted")
    duration_seconds: float
    outcome: Literal["success", "failure"]
    error: str | None = Field(description="why the attempt failed, redacted")
    final: bool


class AttemptPage(BaseModel):
    items: list[AttemptOut]
    next_cursor: str | None


# --- helpers ---------------------------------------------------------------------------------


def _invalid(code: str, what: str, problems: Sequence[str]) -> Problem:
    count = len(problems)
    return Problem(
        422,
        code,
        f"{count} problem{'s' if count != 1 else ''} with {what}: " + "; ".join(problems[:5]),
        problems=list(problems),
    )


def _document(body: object, code: str, what: str) -> object:
    """A JSON body as it is, or YAML/JSON text parsed."""
    if isinstance(body, str):
        if len(body) > MAX_TEXT:
            raise _invalid(code, what, [f"the text is longer than {MAX_TEXT} characters"])
        try:
            body = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise _invalid(code, what, [f"not valid YAML: {exc}"]) from None
        except RecursionError:
            raise _invalid(code, what, ["the YAML is nested too deeply"]) from None
    try:
        has_nul = _has_nul(body)
    except RecursionError:
        raise _invalid(code, what, ["the document is nested too deeply"]) from None
    if has_nul:
        raise _invalid(code, what, ["NUL characters are not allowed"])
    return body


def _has_nul(value: object) -> bool:
    """PostgreSQL text and jsonb cannot hold NUL characters."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def no_nul(value: str | None, name: str) -> str | None:
    """A query parameter PostgreSQL can compare (text cannot hold NUL)."""
    if value is not None and "\x00" in value:
        raise Problem(422, "validation", f"{name}: NUL characters are not allowed")
    return value


def _parse_groups(data: object, source: str) -> tuple[RuleGroup, ...]:
    try:
        groups = parse_rule_groups(data, source)
    except RuleError as exc:
        raise _invalid("invalid_rules", "the rules", exc.problems) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise _invalid("invalid_rules", "the rules", [str(exc) or type(exc).__name__]) from None
    bad = [
        f'group "{g.name}": field name: must not hold "/" or control characters'
        for g in groups
        if "/" in g.name or any(ord(c) < 32 for c in g.name) or len(g.name) > 200
    ]
    if bad:
        raise _invalid("invalid_rules", "the rules", bad)
    return groups


def _group_spec(group: RuleGroup) -> dict[str, Any]:
    spec: dict[str, Any] = rules_to_dict([group])["groups"][0]
    return spec


def _group_out(group: RuleGroup, updated_at: datetime) -> RuleGroupOut:
    return RuleGroupOut(
        name=group.name, rule_count=len(group.rules), spec=_group_spec(group), updated_at=updated_at
    )


def _stored_out(group: RuleGroup, row: Mapping[str, Any]) -> RuleGroupOut:
    """A stored group as stored (one a later, stricter loader refuses is shown as is)."""
    spec = row["spec"] if isinstance(row["spec"], dict) else {}
    rules = spec.get("rules")
    count = len(group.rules) or (len(rules) if isinstance(rules, list) else 0)
    return RuleGroupOut(name=group.name, rule_count=count, spec=spec, updated_at=row["updated_at"])


async def _stored_groups(uow: UnitOfWork, lock: bool = False) -> dict[str, tuple[RuleGroup, Any]]:
    """The tenant's groups by name; a stored group that no longer loads counts with the
    rules its spec lists (so it still counts against the limit) but is shown as stored."""
    rows = await (
        await uow.conn.execute(
            "SELECT name, spec, updated_at FROM alert_rule_groups WHERE tenant_id = %s"
            " ORDER BY name" + (" FOR UPDATE" if lock else ""),
            (uow.tenant_id,),
        )
    ).fetchall()
    out: dict[str, tuple[RuleGroup, Any]] = {}
    for row in rows:
        try:
            (group,) = parse_rule_groups({"groups": [row["spec"]]}, row["name"])
        except (RuleError, ValueError):
            group = RuleGroup(row["name"], ())
        out[row["name"]] = (group, row)
    return out


async def _rule_limit(uow: UnitOfWork) -> int:
    """The plan's max_alert_rules; the tenant row is locked so that concurrent writers of
    rules are serialized (two cannot both take the last free slot)."""
    column = QUOTAS[RULE_QUOTA].limit_column
    row = await (
        await uow.conn.execute(
            f"""SELECT p.{column} AS lim FROM tenants t JOIN plans p ON p.id = t.plan_id
                WHERE t.id = %s FOR UPDATE OF t""",
            (uow.tenant_id,),
        )
    ).fetchone()
    return int(row["lim"]) if row else 0


def _check_limit(groups: Sequence[RuleGroup], limit: int) -> None:
    try:
        check_rule_limit(groups, limit)
    except RuleLimitExceeded as exc:
        raise Problem(
            409,
            "quota_exceeded",
            exc.problems[0],
            limit=QUOTAS[RULE_QUOTA].limit_column,
            limit_value=limit,
            current=count_rules(groups),
        ) from None


async def _save_group(uow: UnitOfWork, group: RuleGroup, now: datetime) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            """INSERT INTO alert_rule_groups (tenant_id, name, spec, eval_interval,
                   evaluation_delay, updated_at) VALUES (%s, %s, %s, %s, %s, %s)
               ON CONFLICT (tenant_id, name) DO UPDATE SET spec = excluded.spec,
                   eval_interval = excluded.eval_interval,
                   evaluation_delay = excluded.evaluation_delay,
                   updated_at = excluded.updated_at
               RETURNING updated_at""",
            (
                uow.tenant_id,
                group.name,
                Jsonb(_group_spec(group)),
                group.interval,
                group.evaluation_delay,
                now,
            ),
        )
    ).fetchone()
    assert row is not None
    return row


# --- rule groups --------------------------------------------------------------------------


async def list_rule_groups(db: Database, access: TenantAccess) -> RuleGroupList:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert_rule_group"))
        stored = await _stored_groups(uow)
        column = QUOTAS[RULE_QUOTA].limit_column
        plan = await (
            await uow.conn.execute(
                f"SELECT p.{column} AS lim FROM tenants t JOIN plans p ON p.id = t.plan_id"
                " WHERE t.id = %s",
                (uow.tenant_id,),
            )
        ).fetchone()
    items = [_stored_out(g, row) for g, row in stored.values()]
    return RuleGroupList(
        items=items,
        rule_count=count_rules([g for g, _ in stored.values()]),
        rule_limit=int(plan["lim"]) if plan else 0,
    )


async def get_rule_group(db: Database, access: TenantAccess, name: str) -> RuleGroupOut:
    if "\x00" in name:
        name = ""  # names nothing that can exist
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert_rule_group", name))
        stored = await _stored_groups(uow)
    if name not in stored:
        raise not_found("rule group")
    group, row = stored[name]
    return _stored_out(group, row)


async def save_rule_groups(
    db: Database,
    access: TenantAccess,
    groups: Sequence[RuleGroup],
    *,
    must_exist: str | None = None,
    must_not_exist: bool = False,
) -> list[RuleGroupOut]:
    """Store `groups` (replacing those of the same names) in one transaction, after the
    plan's limit is checked against the tenant's whole rule set as it would be."""
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("alert_rule_group", must_exist))
        limit = await _rule_limit(uow)
        stored = await _stored_groups(uow, lock=True)
        if must_exist is not None and must_exist not in stored:
            raise not_found("rule group")
        if must_not_exist:
            taken = sorted(g.name for g in groups if g.name in stored)
            if taken:
                raise Problem(
                    409,
                    "conflict",
                    f"a rule group named {taken[0]!r} exists; PUT it to replace it",
                )
        after = {name: g for name, (g, _) in stored.items()}
        after.update({g.name: g for g in groups})
        _check_limit(list(after.values()), limit)
        now = uow.clock.now()
        out: list[RuleGroupOut] = []
        for group in groups:
            row = await _save_group(uow, group, now)
            before = stored[group.name][1]["spec"] if group.name in stored else None
            result = _group_out(group, row["updated_at"])
            action = "alert_rule_group." + ("updated" if before is not None else "created")
            await uow.record(action, "alert_rule_group", group.name, before, result.spec)
            out.append(result)
    return out


async def create_rule_group(db: Database, access: TenantAccess, body: object) -> RuleGroupOut:
    data = _document(body, "invalid_rules", "the rule group")
    (group,) = _one_group(data)
    (out,) = await save_rule_groups(db, access, [group], must_not_exist=True)
    return out


async def replace_rule_group(
    db: Database, access: TenantAccess, name: str, body: object
) -> RuleGroupOut:
    if "\x00" in name:
        name = ""  # names nothing that can exist
    data = _document(body, "invalid_rules", "the rule group")
    if isinstance(data, dict):
        given = data.get("name")
        if given is not None and given != name:
            raise _invalid(
                "invalid_rules",
                "the rule group",
                [f"field name: {given!r} differs from the group in the path ({name!r})"],
            )
        data = {**data, "name": name}
    (group,) = _one_group(data)
    (out,) = await save_rule_groups(db, access, [group], must_exist=name)
    return out


def _one_group(data: object) -> tuple[RuleGroup]:
    if not isinstance(data, dict):
        raise _invalid("invalid_rules", "the rule group", ["the group must be a mapping"])
    if "groups" in data:
        raise _invalid(
            "invalid_rules",
            "the rule group",
            ["this takes one group (name, rules, ...); import a rule file at .../rule-files"],
        )
    groups = _parse_groups({"groups": [data]}, "request")
    return (groups[0],)


async def import_rule_file(db: Database, access: TenantAccess, body: object) -> list[RuleGroupOut]:
    data = _document(body, "invalid_rules", "the rule file")
    groups = _parse_groups(data, "rule file")
    if not groups:
        raise _invalid("invalid_rules", "the rule file", ["the file holds no rule groups"])
    return await save_rule_groups(db, access, groups)


async def delete_rule_group(db: Database, access: TenantAccess, name: str) -> None:
    if "\x00" in name:
        name = ""  # names nothing that can exist
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("alert_rule_group", name))
        row = await (
            await uow.conn.execute(
                "DELETE FROM alert_rule_groups WHERE tenant_id = %s AND name = %s RETURNING spec",
                (uow.tenant_id, name),
            )
        ).fetchone()
        if row is None:
            raise not_found("rule group")
        await uow.record("alert_rule_group.deleted", "alert_rule_group", name, row["spec"], None)


# --- notification config ---------------------------------------------------------------------


def _redacted(config: NotificationConfig) -> dict[str, Any]:
    data: dict[str, Any] = config.to_dict(reveal=False)
    return data


def _sealed(config: NotificationConfig, sealer: Sealer, tenant_id: str) -> dict[str, Any]:
    """`NotificationConfig.to_dict` with every URL sealed, as `AlertStore` stores it."""
    data = config.to_dict(reveal=False)
    for receiver in data["receivers"]:
        urls = config.receivers[receiver["name"]].urls
        receiver["urls"] = [
            {
                SEALED: base64.b64encode(
                    url.seal(sealer, receiver_context(tenant_id, receiver["name"], i))
                ).decode()
            }
            for i, url in enumerate(urls)
        ]
    return data


def _opened(data: Mapping[str, Any], sealer: Sealer, tenant_id: str) -> NotificationConfig:
    plain = json.loads(json.dumps(data))
    for receiver in plain.get("receivers", []):
        receiver["urls"] = [
            SecretURL.unseal(
                sealer,
                base64.b64decode(url[SEALED]),
                receiver_context(tenant_id, receiver["name"], i),
            ).reveal()
            for i, url in enumerate(receiver.get("urls", []))
        ]
    return parse_config(plain)


async def _config_row(uow: UnitOfWork, lock: bool = False) -> dict[str, Any] | None:
    return await (
        await uow.conn.execute(
            "SELECT config, updated_at FROM alert_notification_config WHERE tenant_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (uow.tenant_id,),
        )
    ).fetchone()


async def get_notification_config(
    db: Database, access: TenantAccess, sealer: Sealer
) -> NotificationConfigOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert_notification_config"))
        row = await _config_row(uow)
    if row is None:
        return NotificationConfigOut(config=None, updated_at=None)
    config = _opened(row["config"], sealer, str(access.tenant_id))
    return NotificationConfigOut(config=_redacted(config), updated_at=row["updated_at"])


async def put_notification_config(
    db: Database, access: TenantAccess, sealer: Sealer, body: object
) -> NotificationConfigOut:
    data = _document(body, "invalid_config", "the notification config")
    try:
        config = parse_config(data)
    except ConfigError as exc:
        raise _invalid("invalid_config", "the notification config", [str(exc)]) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise _invalid(
            "invalid_config", "the notification config", [str(exc) or type(exc).__name__]
        ) from None
    tenant = str(access.tenant_id)
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("alert_notification_config"))
        current = await _config_row(uow, lock=True)
        before = _redacted(_opened(current["config"], sealer, tenant)) if current else None
        now = uow.clock.now()
        await uow.conn.execute(
            """INSERT INTO alert_notification_config (tenant_id, config, updated_at)
               VALUES (%s, %s, %s) ON CONFLICT (tenant_id)
               DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at""",
            (uow.tenant_id, Jsonb(_sealed(config, sealer, tenant)), now),
        )
        after = _redacted(config)
        await uow.record(
            "alert_notification_config.updated", "alert_notification_config", tenant, before, after
        )
    return NotificationConfigOut(config=after, updated_at=now)


# --- silences ----------------------------------------------------------------------------------


def _silence_out(silence: Silence, now: datetime) -> SilenceOut:
    return SilenceOut(
        id=silence.id,
        matchers=[MatcherOut(**m.to_dict()) for m in silence.matchers],
        starts_at=silence.starts_at,
        ends_at=silence.ends_at,
        created_by=silence.created_by,
        comment=silence.comment,
        updated_at=silence.updated_at,
        state=silence.state(now).value,
    )


async def _save_silence(uow: UnitOfWork, silence: Silence) -> None:
    await uow.conn.execute(
        """INSERT INTO alert_silences (tenant_id, id, silence, ends_at, updated_at)
           VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant_id, id)
           DO UPDATE SET silence = excluded.silence, ends_at = excluded.ends_at,
               updated_at = excluded.updated_at""",
        (uow.tenant_id, silence.id, Jsonb(silence.to_dict()), silence.ends_at, silence.updated_at),
    )


async def list_silences(
    db: Database,
    access: TenantAccess,
    state: SilenceState | None,
    limit: int,
    after: uuid.UUID | None,
) -> tuple[list[SilenceOut], bool]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert_silence"))
        now = uow.clock.now()
        starts = "(silence->>'startsAt')::timestamptz"
        conditions = {
            None: "",
            SilenceState.EXPIRED: " AND ends_at <= %(now)s",
            SilenceState.ACTIVE: f" AND ends_at > %(now)s AND {starts} <= %(now)s",
            SilenceState.PENDING: f" AND {starts} > %(now)s",
        }[state]
        rows = await (
            await uow.conn.execute(
                "SELECT silence FROM alert_silences WHERE tenant_id = %(tenant)s"
                " AND (%(after)s::text IS NULL OR id > %(after)s::text)"
                + conditions
                + " ORDER BY id LIMIT %(limit)s",
                {
                    "tenant": uow.tenant_id,
                    "after": str(after) if after else None,
                    "now": now,
                    "limit": limit + 1,
                },
            )
        ).fetchall()
    found = [Silence.from_dict(r["silence"]) for r in rows]
    more = len(found) > limit
    return [_silence_out(s, now) for s in found[:limit]], more


async def create_silence(db: Database, access: TenantAccess, body: SilenceCreate) -> SilenceOut:
    if _has_nul(body.model_dump()):
        raise _invalid("invalid_silence", "the silence", ["NUL characters are not allowed"])
    try:
        matchers: list[Matcher] = []
        for item in body.matchers:
            if isinstance(item, str):
                matchers.extend(parse_matchers(item))
            else:
                matchers.append(Matcher.from_dict(item.model_dump()))
    except MatcherError as exc:
        raise _invalid("invalid_silence", "the silence", [str(exc)]) from None
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("alert_silence", creating=True))
        now = uow.clock.now()
        author = await _author(uow, access)
        silences = Silences(id_factory=lambda: str(new_id()))
        try:
            silence = silences.add(
                matchers=matchers,
                starts_at=body.starts_at or now,
                ends_at=body.ends_at,
                created_by=author,
                comment=body.comment,
                now=now,
            )
        except SilenceError as exc:
            raise _invalid("invalid_silence", "the silence", [str(exc)]) from None
        await _save_silence(uow, silence)
        out = _silence_out(silence, now)
        await uow.record(
            "alert_silence.created", "alert_silence", silence.id, None, out.model_dump(mode="json")
        )
    return out


async def _author(uow: UnitOfWork, access: TenantAccess) -> str:
    principal = access.principal
    if principal.user_id is not None:
        row = await (
            await uow.conn.execute("SELECT email FROM users WHERE id = %s", (principal.user_id,))
        ).fetchone()
        if row is not None:
            email = str(row["email"])
            return f"{email} (API token)" if principal.kind == "token" else email
    return f"{principal.kind}:{principal.id}"


async def expire_silence(db: Database, access: TenantAccess, silence_id: uuid.UUID) -> SilenceOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("alert_silence", silence_id))
        row = await (
            await uow.conn.execute(
                "SELECT silence FROM alert_silences WHERE tenant_id = %s AND id = %s FOR UPDATE",
                (uow.tenant_id, str(silence_id)),
            )
        ).fetchone()
        if row is None:
            raise not_found("silence")
        now = uow.clock.now()
        current = Silence.from_dict(row["silence"])
        silences = Silences()
        silences.restore([current])
        try:
            expired = silences.expire(current.id, now)
        except SilenceError as exc:
            raise Problem(409, "already_expired", str(exc)) from None
        await _save_silence(uow, expired)
        before, out = _silence_out(current, now), _silence_out(expired, now)
        await uow.record(
            "alert_silence.expired",
            "alert_silence",
            current.id,
            before.model_dump(mode="json"),
            out.model_dump(mode="json"),
        )
    return out


# --- alerts, history, delivery attempts -----------------------------------------------------


def _value(value: float) -> float | str:
    """JSON has no NaN or infinities: those go as text, as the stored state has them."""
    return encode_value(value)


async def list_alerts(
    db: Database, access: TenantAccess, state: str | None, alertname: str | None
) -> AlertList:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert"))
        rows = await (
            await uow.conn.execute(
                "SELECT group_name, state FROM alert_group_state WHERE tenant_id = %s"
                " ORDER BY group_name",
                (uow.tenant_id,),
            )
        ).fetchall()
        silence_rows = await (
            await uow.conn.execute(
                "SELECT silence FROM alert_silences WHERE tenant_id = %s AND ends_at > %s",
                (uow.tenant_id, uow.clock.now()),
            )
        ).fetchall()
        now = uow.clock.now()
    silences = Silences()
    silences.restore(Silence.from_dict(r["silence"]) for r in silence_rows)
    items: list[AlertOut] = []
    rules: list[RuleHealthOut] = []
    for row in rows:
        group_state = GroupState.from_dict(row["state"])
        for rule_id in sorted(group_state.rules):
            rule = group_state.rules[rule_id]
            rules.append(
                RuleHealthOut(
                    group=row["group_name"],
                    rule_id=rule_id,
                    health=rule.health,
                    last_error=rule.last_error,
                    last_evaluated_at=rule.last_evaluated_at,
                )
            )
            for alert in rule.alerts.values():
                if state is not None and alert.state.value != state:
                    continue
                if alertname is not None and alert.alertname != alertname:
                    continue
                items.append(
                    AlertOut(
                        fingerprint=alert.fingerprint,
                        group=row["group_name"],
                        rule_id=alert.rule_id,
                        alertname=alert.alertname,
                        labels=dict(alert.labels),
                        annotations=dict(alert.annotations),
                        state=alert.state.value,
                        value=_value(alert.value),
                        active_since=alert.active_since,
                        last_active_at=alert.last_active_at,
                        fired_at=alert.fired_at,
                        resolved_at=alert.resolved_at,
                        silenced_by=silences.muted_by(alert.labels, now),
                    )
                )
    items.sort(key=lambda a: (a.state != "firing", a.alertname, sorted(a.labels.items())))
    return AlertList(items=items, rules=rules)


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, count: int) -> tuple[datetime, list[str]] | None:
    """(time, the other parts) of a cursor `encode_cursor` made; 400 for anything else."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
        if (
            isinstance(parts, list)
            and len(parts) == count
            and all(isinstance(p, str) and "\x00" not in p for p in parts)
        ):
            return datetime.fromisoformat(parts[0]), parts[1:]
    except (binascii.Error, ValueError, UnicodeDecodeError):
        pass
    raise Problem(400, "bad_cursor", "the cursor is not one this API returned")


async def list_transitions(
    db: Database,
    access: TenantAccess,
    limit: int,
    cursor: str | None,
    fingerprint: str | None,
) -> TransitionPage:
    after = decode_cursor(cursor, 2)
    fingerprint = no_nul(fingerprint, "fingerprint")
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM alert_transitions WHERE tenant_id = %(tenant)s
                   AND (%(fp)s::text IS NULL OR fingerprint = %(fp)s::text)
                   AND (%(at)s::timestamptz IS NULL OR (at, key) < (%(at)s::timestamptz,
                        %(key)s::text))
                   ORDER BY at DESC, key DESC LIMIT %(limit)s""",
                {
                    "tenant": uow.tenant_id,
                    "fp": fingerprint,
                    "at": after[0] if after else None,
                    "key": after[1][0] if after else None,
                    "limit": limit + 1,
                },
            )
        ).fetchall()
    items = [
        TransitionOut(
            key=r["key"],
            fingerprint=r["fingerprint"],
            rule_id=r["rule_id"],
            group=r["group_name"],
            alertname=r["alertname"],
            labels=r["labels"],
            annotations=r["annotations"],
            from_state=r["from_state"],
            to_state=r["to_state"],
            at=r["at"],
            value=_value(r["value"]),
            active_since=r["active_since"],
            fired_at=r["fired_at"],
            resolved_at=r["resolved_at"],
        )
        for r in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last["at"].isoformat(), last["key"])
    return TransitionPage(items=items, next_cursor=next_cursor)


async def list_attempts(
    db: Database,
    access: TenantAccess,
    limit: int,
    cursor: str | None,
    receiver: str | None,
    outcome: str | None,
) -> AttemptPage:
    after = decode_cursor(cursor, 3)
    receiver = no_nul(receiver, "receiver")
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("alert"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM alert_delivery_attempts WHERE tenant_id = %(tenant)s
                   AND (%(receiver)s::text IS NULL OR receiver = %(receiver)s::text)
                   AND (%(outcome)s::text IS NULL OR outcome = %(outcome)s::text)
                   AND (%(at)s::timestamptz IS NULL
                        OR (at, notification_id, attempt) < (%(at)s::timestamptz,
                            %(nid)s::text, %(attempt)s::integer))
                   ORDER BY at DESC, notification_id DESC, attempt DESC LIMIT %(limit)s""",
                {
                    "tenant": uow.tenant_id,
                    "receiver": receiver,
                    "outcome": outcome,
                    "at": after[0] if after else None,
                    "nid": after[1][0] if after else None,
                    "attempt": _int(after[1][1]) if after else None,
                    "limit": limit + 1,
                },
            )
        ).fetchall()
    items = [
        AttemptOut(
            notification_id=r["notification_id"],
            attempt=r["attempt"],
            at=r["at"],
            group_key=r["group_key"],
            receiver=r["receiver"],
            integration=r["integration"],
            target=r["target"],
            duration_seconds=r["duration_seconds"],
            outcome=r["outcome"],
            error=r["error"],
            final=r["final"],
        )
        for r in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(
            last["at"].isoformat(), last["notification_id"], str(last["attempt"])
        )
    return AttemptPage(items=items, next_cursor=next_cursor)


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**31:
        raise Problem(400, "bad_cursor", "the cursor is not one this API returned")
    return value
