"""initial schema: images, machines, groups, sessions, users, tokens, events

Revision ID: 0001
Revises:
Create Date: 2026-11-26 00:36:47.276640
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "app_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("app_user", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_app_user_username"), ["username"], unique=True)

    op.create_table(
        "event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=48), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=True),
        sa.Column("machine_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.String(length=4096), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_event_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_event_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_event_machine_id"), ["machine_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_event_session_id"), ["session_id"], unique=False)

    op.create_table(
        "image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("image_size", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data_bytes", sa.BigInteger(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("block_count", sa.Integer(), nullable=False),
        sa.Column("data_blocks", sa.Integer(), nullable=False),
        sa.Column("zero_blocks", sa.Integer(), nullable=False),
        sa.Column("partition_table", sa.String(length=16), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_name"), ["name"], unique=True)

    op.create_table(
        "machine_group",
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("machine_group", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_machine_group_name"), ["name"], unique=True)

    op.create_table(
        "deploy_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("image_name", sa.String(length=128), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("start_policy", sa.JSON(), nullable=False),
        sa.Column("rate_bps", sa.BigInteger(), nullable=True),
        sa.Column("mcast_group", sa.String(length=15), nullable=False),
        sa.Column("mcast_port", sa.Integer(), nullable=False),
        sa.Column("wire_session_id", sa.BigInteger(), nullable=False),
        sa.Column("key_hex", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=2048), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("rerun_of", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["machine_group.id"],
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["image.id"],
        ),
        sa.ForeignKeyConstraint(
            ["rerun_of"],
            ["deploy_session.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deploy_session_image_id"), ["image_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_deploy_session_state"), ["state"], unique=False)

    op.create_table(
        "machine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.Column("macs", sa.JSON(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("inventory", sa.JSON(), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_image_id", sa.Integer(), nullable=True),
        sa.Column("last_deployed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_outcome", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["machine_group.id"],
        ),
        sa.ForeignKeyConstraint(
            ["last_image_id"],
            ["image.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("machine", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_machine_group_id"), ["group_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_machine_mac"), ["mac"], unique=True)

    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("machine_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["machine_id"],
            ["machine.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["app_user.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_token_machine_id"), ["machine_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_api_token_token_hash"), ["token_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_api_token_user_id"), ["user_id"], unique=False)

    op.create_table(
        "session_machine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=2048), nullable=False),
        sa.Column("receiver_id", sa.BigInteger(), nullable=True),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("blocks_done", sa.Integer(), nullable=False),
        sa.Column("blocks_total", sa.Integer(), nullable=False),
        sa.Column("rate_bps", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("naks", sa.Integer(), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["machine_id"],
            ["machine.id"],
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["deploy_session.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("session_id", "machine_id"),
    )
    with op.batch_alter_table("session_machine", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_session_machine_machine_id"), ["machine_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_session_machine_session_id"), ["session_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("session_machine", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_session_machine_session_id"))
        batch_op.drop_index(batch_op.f("ix_session_machine_machine_id"))

    op.drop_table("session_machine")
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_token_user_id"))
        batch_op.drop_index(batch_op.f("ix_api_token_token_hash"))
        batch_op.drop_index(batch_op.f("ix_api_token_machine_id"))

    op.drop_table("api_token")
    with op.batch_alter_table("machine", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_machine_mac"))
        batch_op.drop_index(batch_op.f("ix_machine_group_id"))

    op.drop_table("machine")
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deploy_session_state"))
        batch_op.drop_index(batch_op.f("ix_deploy_session_image_id"))

    op.drop_table("deploy_session")
    with op.batch_alter_table("machine_group", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_machine_group_name"))

    op.drop_table("machine_group")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_name"))

    op.drop_table("image")
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_event_session_id"))
        batch_op.drop_index(batch_op.f("ix_event_machine_id"))
        batch_op.drop_index(batch_op.f("ix_event_kind"))
        batch_op.drop_index(batch_op.f("ix_event_at"))

    op.drop_table("event")
    with op.batch_alter_table("app_user", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_app_user_username"))

    op.drop_table("app_user")
