"""Index refresh tokens by (family_id, revoked_at), so the edge check can tell at once whether an
access token's session (its refresh-token family) was revoked; it replaces the index on family_id
alone, whose every use it also serves.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_auth_refresh_tokens_family_id_revoked_at", "auth_refresh_tokens", ["family_id", "revoked_at"]
    )
    op.drop_index("ix_auth_refresh_tokens_family_id", table_name="auth_refresh_tokens")


def downgrade() -> None:
    op.create_index("ix_auth_refresh_tokens_family_id", "auth_refresh_tokens", ["family_id"])
    op.drop_index("ix_auth_refresh_tokens_family_id_revoked_at", table_name="auth_refresh_tokens")
