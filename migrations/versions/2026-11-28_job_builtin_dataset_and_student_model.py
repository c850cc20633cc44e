"""job builtin dataset and student model

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 04:05:21.156807
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('builtin_dataset', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('student_model_id', sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_jobs_student_model_id_models'), 'models', ['student_model_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_student_model_id_models'), type_='foreignkey')
        batch_op.drop_column('student_model_id')
        batch_op.drop_column('builtin_dataset')

