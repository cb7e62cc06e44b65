"""A fresh Postgres database per point of `ditserve loadtest ceiling` (loadtests/ceiling.py), on
`--job-store-url`'s server: the point counts only its own jobs, and Postgres' own counters say
how many transactions and rows they cost. Dropped at the point's end."""

from __future__ import annotations

import uuid


class FreshDatabase:
    """A database of its own for one point on `--job-store-url`'s server: the point counts
    only its own jobs, and Postgres counts its transactions and rows. Dropped at the end."""

    STATS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted", "tup_fetched")

    def __init__(self, server_url: str, label: str):
        import sqlalchemy as sa

        self.name = f"ditserve_ceiling_{label}_{uuid.uuid4().hex[:8]}"
        server = sa.engine.make_url(server_url)
        self.url = server.set(database=self.name).render_as_string(hide_password=False)
        self._admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")

    def _sql(self, statement: str, **params):
        import sqlalchemy as sa

        with self._admin.connect() as conn:
            result = conn.execute(sa.text(statement), params)
            return result.mappings().first() if result.returns_rows else None

    def create(self) -> None:
        self._sql(f'CREATE DATABASE "{self.name}"')

    def stats(self) -> dict[str, int]:
        row = self._sql(f"SELECT {', '.join(self.STATS)} FROM pg_stat_database WHERE datname = :name", name=self.name)
        return {key: int(row[key] or 0) for key in self.STATS} if row else {}

    def drop(self) -> None:
        try:
            self._sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            self._admin.dispose()
