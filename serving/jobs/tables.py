"""The job store's tables (jobs, and the webhook outbox), and the in-place upgrade of a store
made by an earlier version. The SQL schema lives here and nowhere else."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    # Insertion order: the list cursor and first-come-first-served order.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("stage", sa.String(16)),
    sa.Column("progress", sa.Integer, nullable=False, default=0),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total_steps", sa.Integer, nullable=False, default=0),
    sa.Column("timestamps", sa.JSON, nullable=False),
    sa.Column("error_code", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("completed_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("video_key", sa.String(256)),
    sa.Column("thumbnail_key", sa.String(256)),
    sa.Column("idempotency_key", sa.String(256), unique=True),
    sa.Column("request_hash", sa.String(64)),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("num_steps", sa.Integer, nullable=False, default=0),
    # The job's device seconds per stage, costed at submit (summed for estimates and admission).
    sa.Column("text_encoder_seconds", sa.Float),
    sa.Column("denoiser_seconds", sa.Float),
    sa.Column("vae_decoder_seconds", sa.Float),
    sa.Column("checkpoint_step", sa.Integer, nullable=False, default=0),
    sa.Column("resumed_from_step", sa.Integer),
    sa.Column("owner", sa.String(64), index=True),
    sa.Column("webhook_url", sa.Text),
    sa.Column("language", sa.String(35)),
    sa.Column("computed_steps", sa.Integer),
    # Device seconds really used per stage, all attempts (usage; the columns above are estimates).
    sa.Column("used_text_encoder_seconds", sa.Float),
    sa.Column("used_denoiser_seconds", sa.Float),
    sa.Column("used_vae_decoder_seconds", sa.Float),
    # A deleted job is first a tombstone: hidden from every read, its lease taken from its
    # driver, its files then removed (files_deleted_at), the row dropped later (see retention).
    sa.Column("deleted_at", sa.Float),
    sa.Column("files_deleted_at", sa.Float),
)

# The webhook outbox: one row per event, written in the same transaction as the job's
# terminal state, delivered (and retried) by the Director's WebhookSender.
webhook_events = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),  # the webhook-id of every attempt
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("url", sa.Text, nullable=False),
    # The job's API key: its webhook secret signs the event (looked up at send time, never stored).
    sa.Column("owner", sa.String(64)),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the exact bytes signed and sent, every attempt
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, index=True),  # None once delivered or given up
    sa.Column("delivered_at", sa.Float),
    sa.Column("last_error", sa.Text),
)


# The usage ledger: one row per job that ended (completed, failed, cancelled or deleted
# unfinished), written in the same transaction as its end. It holds numbers only, and stays
# when the job and its files are deleted or expire: what a key spent is not forgotten with
# its videos. GET /v1/usage sums it.
usage = sa.Table(
    "usage",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False, unique=True),
    sa.Column("owner", sa.String(64), index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("ended_at", sa.Float, nullable=False, index=True),
    sa.Column("video_seconds", sa.Float, nullable=False),  # seconds of video delivered (0 unless completed)
    sa.Column("text_encoder_seconds", sa.Float, nullable=False),
    sa.Column("denoiser_seconds", sa.Float, nullable=False),
    sa.Column("vae_decoder_seconds", sa.Float, nullable=False),
)


def add_missing_columns(engine: sa.Engine) -> None:
    """Stores made by an earlier version lack newer (nullable) columns: add them in place,
    so an upgrade keeps every job."""
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
