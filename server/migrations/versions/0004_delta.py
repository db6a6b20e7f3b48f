"""resume, catch-up and delta re-imaging (issue 9): image families, a session's delta option
and transfer end, each machine's phase and what it was spared or caught up

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 03:00:00

Images registered before this revision get their family from the name (models.image_family:
the part before the last "/", else the whole name); sessions get delta "auto".
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _family(name: str) -> str:
    """models.image_family, copied: a migration must not change when the models do."""
    head, sep, _ = name.rpartition("/")
    return head if sep and head else name


def upgrade() -> None:
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("family", sa.String(length=128), nullable=False, server_default="")
        )
        batch_op.create_index(batch_op.f("ix_image_family"), ["family"], unique=False)
    image = sa.table("image", sa.column("id", sa.Integer), sa.column("name", sa.String))
    family = sa.table("image", sa.column("id", sa.Integer), sa.column("family", sa.String))
    conn = op.get_bind()
    for row in conn.execute(sa.select(image.c.id, image.c.name)).fetchall():
        conn.execute(family.update().where(family.c.id == row.id).values(family=_family(row.name)))
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("delta", sa.String(length=8), nullable=False, server_default="auto")
        )
        batch_op.add_column(sa.Column("transfer_ended_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("session_machine", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("phase", sa.String(length=16), nullable=False, server_default="")
        )
        for name, kind in (
            ("held_blocks", sa.Integer()),
            ("held_bytes", sa.BigInteger()),
            ("catchup_blocks", sa.Integer()),
            ("catchup_bytes", sa.BigInteger()),
        ):
            batch_op.add_column(sa.Column(name, kind, nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("via", sa.String(length=16), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("session_machine", schema=None) as batch_op:
        for name in ("via", "catchup_bytes", "catchup_blocks", "held_bytes", "held_blocks"):
            batch_op.drop_column(name)
        batch_op.drop_column("phase")
    with op.batch_alter_table("deploy_session", schema=None) as batch_op:
        batch_op.drop_column("transfer_ended_at")
        batch_op.drop_column("delta")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_family"))
        batch_op.drop_column("family")
