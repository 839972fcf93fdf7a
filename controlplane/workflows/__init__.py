"""Workflows: ordered steps run on servers as signed commands, with retries and undo.

A use case starts a workflow in its own transaction (`start_workflow`); the driver in
the control-plane worker (`WorkflowDriver`) runs it: each step is one command, retried
with backoff when its failure is retryable, and when a step fails for good the steps
that succeeded are undone in reverse order by their compensation commands. Hooks
registered with `on_workflow_finished` run in the transaction that ends a workflow.

States: a workflow is running → succeeded, or running → compensating → compensated
(everything undone) | failed (an undo failed too; the error says what was left). A step
is pending → running → succeeded | failed, and a succeeded one may go compensating →
compensated | compensation_failed. Tables: `controlplane/schema/0008_workflows.sql`.
"""

from controlplane.workflows.engine import WorkflowDriver, full_jitter, is_retryable
from controlplane.workflows.model import (
    FinalState,
    RetryPolicy,
    StepSpec,
    StepState,
    WorkflowOutcome,
    WorkflowState,
)
from controlplane.workflows.secrets import use_secret_box
from controlplane.workflows.start import on_workflow_finished, start_workflow

__all__ = [
    "FinalState",
    "RetryPolicy",
    "StepSpec",
    "StepState",
    "WorkflowDriver",
    "WorkflowOutcome",
    "WorkflowState",
    "full_jitter",
    "is_retryable",
    "on_workflow_finished",
    "start_workflow",
    "use_secret_box",
]
