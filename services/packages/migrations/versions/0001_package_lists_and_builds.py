"""Users' package lists, the set each wants, and one build per requirement set.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "package_requirements",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("spec", sa.String(256), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
    )
    op.create_table(
        "package_user_sets",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("set_key", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_package_user_sets_set_key", "package_user_sets", ["set_key"])
    op.create_table(
        "package_builds",
        sa.Column("set_key", sa.String(64), primary_key=True),
        sa.Column("requirements", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("environment_key", sa.String(64), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("package_builds")
    op.drop_index("ix_package_user_sets_set_key", table_name="package_user_sets")
    op.drop_table("package_user_sets")
    op.drop_table("package_requirements")
