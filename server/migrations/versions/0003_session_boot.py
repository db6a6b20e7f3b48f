"""a session's post-deployment action (after) and target-disk rule (disk_rule)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 02:00:00

Sessions created before this revision get the defaults the server used for them then
(FLEETCAST_BOOT_AFTER / FLEETCAST_BOOT_DISK defaults): reboot and auto.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("after", sa.String(length=16), nullable=False, server_default="reboot")
        )
        batch_op.add_column(
            sa.Column("disk_rule", sa.String(length=128), nullable=False, server_default="auto")
        )


def downgrade() -> None:
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.drop_column("disk_rule")
        batch_op.drop_column("after")
