"""The alerting API: rule groups, notification config, silences, alerts and their history,
delivery attempts. Reads need `alerts:read`, writes `alerts:write`."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query

from alerting.silences import SilenceState
from controlplane import alerting_admin as svc
from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import encode_cursor

router = APIRouter(prefix="/v1/tenants/{tenant_id}/alerting", tags=["alerting"])

GroupName = Annotated[str, Path(min_length=1, max_length=200, description="the rule group's name")]
SilenceId = Annotated[uuid.UUID, Path(description="the silence")]
PageCursor = Annotated[
    str | None, Query(max_length=500, description="`next_cursor` of the previous page")
]

_TEXT = (
    "YAML (or JSON) text: a JSON string, or the raw text sent with"
    f" `Content-Type: application/yaml`; at most {svc.MAX_TEXT} characters"
)
GroupBody = Annotated[
    dict[str, Any] | str,
    Body(
        description="one rule group in the Prometheus rule-file shape (`name`, `interval`,"
        f" `rules`, ...), as a JSON object or as {_TEXT}",
        openapi_examples={
            "group": {
                "value": {
                    "name": "host",
                    "interval": "1m",
                    "rules": [
                        {
                            "alert": "HostHighLoad",
                            "expr": "system_cpu_load_average_1m > 8",
                            "for": "5m",
                            "labels": {"severity": "page"},
                        }
                    ],
                }
            }
        },
    ),
]
RuleFileBody = Annotated[
    dict[str, Any] | str,
    Body(description=f"a rule file (`groups: [...]`) as a JSON object or as {_TEXT}"),
]
ConfigBody = Annotated[
    dict[str, Any] | str,
    Body(
        description="the notification config (`route`, `receivers`, `inhibit_rules`) as a"
        f" JSON object or as {_TEXT}; receiver URLs are sealed at rest and never shown again"
    ),
]


# --- rule groups -------------------------------------------------------------------------


@router.get("/rule-groups", responses=AUTHED)
async def list_rule_groups(access: TenantScope, cp: ControlPlaneDep) -> svc.RuleGroupList:
    """Every rule group of the tenant, with the rule count and the plan's limit."""
    return await svc.list_rule_groups(cp.db, access)


@router.post("/rule-groups", status_code=201, responses=WRITES)
async def create_rule_group(
    access: TenantScope, body: GroupBody, cp: ControlPlaneDep
) -> svc.RuleGroupOut:
    """A new group (409 `conflict` if the name is taken). Invalid rules: 422
    `invalid_rules` with every problem in `problems`; past the plan's `max_alert_rules`:
    409 `quota_exceeded`."""
    return await svc.create_rule_group(cp.db, access, body)


@router.post("/rule-files", responses=WRITES)
async def import_rule_file(
    access: TenantScope, body: RuleFileBody, cp: ControlPlaneDep
) -> list[svc.RuleGroupOut]:
    """Every group of a rule file, stored atomically: each replaces the group of its name
    (other groups stay). All or nothing: one invalid rule or the plan's limit refuses the
    whole file."""
    return await svc.import_rule_file(cp.db, access, body)


@router.get("/rule-groups/{group_name}", responses=AUTHED)
async def get_rule_group(
    access: TenantScope, group_name: GroupName, cp: ControlPlaneDep
) -> svc.RuleGroupOut:
    return await svc.get_rule_group(cp.db, access, group_name)


@router.put("/rule-groups/{group_name}", responses=WRITES)
async def replace_rule_group(
    access: TenantScope, group_name: GroupName, body: GroupBody, cp: ControlPlaneDep
) -> svc.RuleGroupOut:
    """Replace an existing group (create one with POST .../rule-groups or a rule file).
    The body's `name` may be left out; if given it must be the path's."""
    return await svc.replace_rule_group(cp.db, access, group_name, body)


@router.delete("/rule-groups/{group_name}", status_code=204, responses=WRITES)
async def delete_rule_group(
    access: TenantScope, group_name: GroupName, cp: ControlPlaneDep
) -> None:
    """The group goes; its firing alerts resolve at the alerting service's next pass."""
    await svc.delete_rule_group(cp.db, access, group_name)


# --- notification config -----------------------------------------------------------------


@router.get("/notification-config", responses=AUTHED)
async def get_notification_config(
    access: TenantScope, cp: ControlPlaneDep
) -> svc.NotificationConfigOut:
    """The config with every receiver URL redacted; `config` is null until one is set."""
    return await svc.get_notification_config(cp.db, access, cp.secrets)


@router.put("/notification-config", responses=WRITES)
async def put_notification_config(
    access: TenantScope, body: ConfigBody, cp: ControlPlaneDep
) -> svc.NotificationConfigOut:
    """Replace the config. Invalid: 422 `invalid_config` naming the field."""
    return await svc.put_notification_config(cp.db, access, cp.secrets, body)


# --- silences ----------------------------------------------------------------------------


@router.get("/silences", responses=AUTHED)
async def list_silences(
    access: TenantScope,
    cp: ControlPlaneDep,
    state: Annotated[Literal["pending", "active", "expired"] | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> svc.SilencePage:
    chosen = SilenceState(state) if state else None
    items, more = await svc.list_silences(cp.db, access, chosen, limit, after(cursor))
    last = uuid.UUID(items[-1].id) if more and items else None
    return svc.SilencePage(items=items, next_cursor=encode_cursor(last) if last else None)


@router.post("/silences", status_code=201, responses=WRITES)
async def create_silence(
    access: TenantScope, body: svc.SilenceCreate, cp: ControlPlaneDep
) -> svc.SilenceOut:
    """`created_by` is the caller. Invalid matchers or times: 422 `invalid_silence`."""
    return await svc.create_silence(cp.db, access, body)


@router.delete("/silences/{silence_id}", responses=WRITES)
async def expire_silence(
    access: TenantScope, silence_id: SilenceId, cp: ControlPlaneDep
) -> svc.SilenceOut:
    """Expire the silence now (it stays listed as expired). Already expired: 409."""
    return await svc.expire_silence(cp.db, access, silence_id)


# --- alerts --------------------------------------------------------------------------------


@router.get("/alerts", responses=AUTHED)
async def list_alerts(
    access: TenantScope,
    cp: ControlPlaneDep,
    state: Annotated[Literal["pending", "firing", "resolved"] | None, Query()] = None,
    alertname: Annotated[str | None, Query(max_length=200)] = None,
) -> svc.AlertList:
    """The current alerts from the evaluator's stored state, and each rule's health."""
    return await svc.list_alerts(cp.db, access, state, alertname)


@router.get("/alerts/history", responses=AUTHED)
async def list_transitions(
    access: TenantScope,
    cp: ControlPlaneDep,
    fingerprint: Annotated[str | None, Query(max_length=200)] = None,
    limit: Limit = 50,
    cursor: PageCursor = None,
) -> svc.TransitionPage:
    """State transitions, newest first."""
    return await svc.list_transitions(cp.db, access, limit, cursor, fingerprint)


@router.get("/delivery-attempts", responses=AUTHED)
async def list_attempts(
    access: TenantScope,
    cp: ControlPlaneDep,
    receiver: Annotated[str | None, Query(max_length=200)] = None,
    outcome: Annotated[Literal["success", "failure"] | None, Query()] = None,
    limit: Limit = 50,
    cursor: PageCursor = None,
) -> svc.AttemptPage:
    """Every attempt to deliver a notification, newest first; failures carry the
    receiver's error, redacted, as does `target` (the receiver URL)."""
    return await svc.list_attempts(cp.db, access, limit, cursor, receiver, outcome)
