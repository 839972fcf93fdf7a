"""What a workflow is made of: steps with a retry policy and an optional compensation,
and the outcome finished-workflow hooks receive."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

WorkflowState = Literal["running", "compensating", "succeeded", "failed", "compensated"]
StepState = Literal[
    "pending",
    "running",
    "succeeded",
    "failed",
    "compensating",
    "compensated",
    "compensation_failed",
]
FinalState = Literal["succeeded", "failed", "compensated"]

ACTIVE: tuple[WorkflowState, ...] = ("running", "compensating")

# Engines name commands `engine.verb` or `engine.noun.verb` (`site.certificate.issue`).
COMMAND_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,62}){1,4}$")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a step (or its compensation) is tried, and how long to wait in between.

    The wait before attempt n+1 is drawn uniformly from [0, min(max_delay_s,
    base_delay_s * 2**(n-1))] ("full jitter"): growing caps back off from a struggling
    node, and the randomness keeps many workflows that failed together from retrying
    in lockstep.
    """

    max_attempts: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy delays cannot be negative")

    def cap(self, failed_attempt: int) -> float:
        """The upper bound of the wait after attempt `failed_attempt` (1-based) failed."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempt - 1)))


@dataclass(frozen=True)
class StepSpec:
    """One step: a command on one server, and the command that undoes it.

    `payload` may hold `{"$secret": "…"}` values; they are stored sealed under the master
    key and reach the agent sealed to its own key, never in the clear.
    """

    name: str
    server_id: uuid.UUID
    command_type: str
    payload: dict[str, Any]
    compensation: tuple[str, dict[str, Any]] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: int = 120


@dataclass(frozen=True)
class WorkflowOutcome:
    """How a workflow ended, handed to the hooks registered for its kind.

    `compensated`: a step failed for good and every completed step was undone.
    `failed`: a step failed and undoing an earlier one failed too; `error` says what was
    left in place.
    """

    workflow_id: uuid.UUID
    tenant_id: uuid.UUID
    kind: str
    subject_type: str
    subject_id: uuid.UUID
    state: FinalState
    error: str | None
    outputs: dict[str, dict[str, Any]]
