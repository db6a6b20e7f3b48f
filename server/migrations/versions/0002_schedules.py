"""schedules and their runs, a session's transfer start, a group's Wake-on-LAN target

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 01:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("image", sa.String(length=128), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("machine_ids", sa.JSON(), nullable=False),
        sa.Column("start_policy", sa.JSON(), nullable=False),
        sa.Column("rate_bps", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("once_at", sa.String(length=32), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("weekdays", sa.JSON(), nullable=False),
        sa.Column("time", sa.String(length=5), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("window_end", sa.String(length=5), nullable=False),
        sa.Column("on_window_end", sa.String(length=8), nullable=False),
        sa.Column("wake_lead", sa.Float(), nullable=False),
        sa.Column("grace", sa.Float(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["machine_group.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("schedule", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_schedule_name"), ["name"], unique=True)

    op.create_table(
        "schedule_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=2048), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=True),
        sa.Column("woken", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedule.id"]),
        sa.ForeignKeyConstraint(["session_id"], ["deploy_session.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("schedule_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_schedule_run_schedule_id"), ["schedule_id"])

    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.add_column(sa.Column("transfer_started_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("machine_group", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("wol_broadcast", sa.String(length=45), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("wol_port", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("machine_group", schema=None) as batch_op:
        batch_op.drop_column("wol_port")
        batch_op.drop_column("wol_broadcast")
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.drop_column("transfer_started_at")
    op.drop_table("schedule_run")
    op.drop_table("schedule")
