"""Hosting resources of the control plane: sites with their domains, redirects and
certificates, FTP accounts, MariaDB databases and users, Redis users.

The control plane stores desired state and starts a workflow; engines on the node
enforce it. `install_hooks` makes each resource follow its workflow's outcome; it runs
wherever workflows finish (the worker) and is harmless to call twice.
"""

from __future__ import annotations

from controlplane.workflows import on_workflow_finished


def install_hooks() -> None:
    from controlplane.hosting import certificates, sites
    from controlplane.hosting.databases import DATABASE, DATABASE_USER
    from controlplane.hosting.ftp import FTP
    from controlplane.hosting.redis import REDIS_USER

    on_workflow_finished(sites.CREATE, sites.on_applied)
    on_workflow_finished(sites.UPDATE, sites.on_applied)
    on_workflow_finished(sites.DELETE, sites.on_deleted)
    on_workflow_finished(certificates.ISSUE, certificates.on_finished)
    on_workflow_finished(certificates.RENEW, certificates.on_finished)
    for kind in (FTP, DATABASE, DATABASE_USER, REDIS_USER):
        on_workflow_finished(kind.create_kind, kind.on_create)
        on_workflow_finished(kind.rotate_kind, kind.on_rotate)
        on_workflow_finished(kind.delete_kind, kind.on_delete)


install_hooks()
