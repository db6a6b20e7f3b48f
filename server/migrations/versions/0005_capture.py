"""network capture and backups (issue 10): session kind and target image, capture upload
state, backup schedules with retention

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 03:20:00

Sessions before this revision are deployments (kind "deploy"); a capture session has no
image until its upload completes, so deploy_session.image_id becomes nullable. Schedules
before it deploy (action "deploy"; retention {} means the defaults).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=8), nullable=False, server_default="deploy")
        )
        batch_op.add_column(
            sa.Column("target_image", sa.String(length=128), nullable=False, server_default="")
        )
        batch_op.alter_column("image_id", existing_type=sa.Integer(), nullable=True)
    with op.batch_alter_table("schedule", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("action", sa.String(length=8), nullable=False, server_default="deploy")
        )
        batch_op.add_column(
            sa.Column("retention", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
    op.create_table(
        "capture",
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("target_image", sa.String(length=128), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("backup", sa.Boolean(), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=True),
        sa.Column("schedule_run_id", sa.Integer(), nullable=True),
        sa.Column("uploaded_blocks", sa.Integer(), nullable=False),
        sa.Column("uploaded_bytes", sa.BigInteger(), nullable=False),
        sa.Column("reused_blocks", sa.Integer(), nullable=False),
        sa.Column("reused_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data_blocks", sa.Integer(), nullable=False),
        sa.Column("read_bytes", sa.BigInteger(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("manifest_digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["session_id"], ["deploy_session.id"]),
        sa.ForeignKeyConstraint(["machine_id"], ["machine.id"]),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedule.id"]),
        sa.ForeignKeyConstraint(["schedule_run_id"], ["schedule_run.id"]),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"]),
        sa.PrimaryKeyConstraint("session_id"),
    )
    with op.batch_alter_table("capture", schema=None) as batch_op:
        for column in ("machine_id", "schedule_id", "schedule_run_id", "image_id"):
            batch_op.create_index(batch_op.f(f"ix_capture_{column}"), [column], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("capture", schema=None) as batch_op:
        for column in ("image_id", "schedule_run_id", "schedule_id", "machine_id"):
            batch_op.drop_index(batch_op.f(f"ix_capture_{column}"))
    op.drop_table("capture")
    with op.batch_alter_table("schedule", schema=None) as batch_op:
        batch_op.drop_column("retention")
        batch_op.drop_column("action")
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.alter_column("image_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("target_image")
        batch_op.drop_column("kind")
