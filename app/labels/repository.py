"""The SQL of `?label=` filters, shared by the models' and the jobs' list queries.

Labels live in their own tables (model_labels, job_labels: one row per key, primary key (resource id, key), an index
on (key, value)), so a filter is plain portable SQL on SQLite and PostgreSQL: one correlated EXISTS per requested
label, ANDed, beside the owner and cursor conditions of the list query.
"""
from __future__ import annotations

from sqlalchemy import exists


def filter_clauses(label_cls, owner_fk, parent_id, filters: list[tuple[str, str | None]]) -> list:
    """One correlated EXISTS per filter, e.g. EXISTS (SELECT 1 FROM job_labels WHERE job_id = jobs.id AND key = :k
    AND value = :v); the (resource id, key) primary key answers each."""
    clauses = []
    for key, value in filters:
        cond = [owner_fk == parent_id, label_cls.key == key]
        if value is not None:
            cond.append(label_cls.value == value)
        clauses.append(exists().where(*cond))
    return clauses
