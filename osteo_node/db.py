"""Database schema and engine. The schema is migrated with alembic (`osteo_node/migrations/`).

SQLite (the embedded default) runs in WAL mode with full fsync, and every transaction starts
with BEGIN IMMEDIATE so that two processes never interleave a read-then-write (job claims stay
exclusive); a connection with the READ_ONLY options begins a plain read transaction instead.
PostgreSQL claims jobs with FOR UPDATE SKIP LOCKED (see queue.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)


def utcnow() -> dt.datetime:
    """Naive UTC: every timestamp in the database is UTC without a zone."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """A received DICOM instance: where its bytes are and whether it is screened."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID, default="")
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    eligible: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Job(Base):
    """A unit of work: `infer` one instance, or `send` its results to one destination.

    Only osteo_node.queue changes rows of this table.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("instance_id", "kind", "destination", name="uq_jobs_instance_kind_dest"),
        Index("ix_jobs_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    destination: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Result(Base):
    """A model's result for one instance, and the DICOM objects that carry it."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("instance_id", "device_uid", name="uq_results_instance_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    device_uid: Mapped[str] = mapped_column(UID)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    p_normal: Mapped[float] = mapped_column(Float)
    p_osteopenia: Mapped[float] = mapped_column(Float)
    p_osteoporosis: Mapped[float] = mapped_column(Float)
    category: Mapped[str] = mapped_column(String(16))
    sr_path: Mapped[str] = mapped_column(String(255))
    sc_path: Mapped[str] = mapped_column(String(255))
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID)
    sc_sop_instance_uid: Mapped[str] = mapped_column(UID)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ScreenedImage(Base):
    """Who and what an infer job screened: the patient key and the facts that validation groups by.

    Written with the live model's result (one row per instance), for every screened woman whether
    flagged or not, so that DXA results can be paired with images (osteo_node.dxa, validation).
    Holds the patient key (PatientID + Issuer) but no name; like `referrals`, never logged.
    """

    __tablename__ = "screened_images"
    __table_args__ = (Index("ix_screened_images_patient", "patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    #: StudyDate, else AcquisitionDate/ContentDate/SeriesDate; None when the header has none.
    image_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class DxaResult(Base):
    """One DXA examination's T-scores, from HL7, CSV, FHIR or manual entry (osteo_node.dxa).

    Rows are never updated: a correction is a new row whose `supersedes_id` names the old one.
    `fingerprint` (SHA-256 of patient key, date and values) makes every route idempotent: the
    same result delivered twice is stored once.
    """

    __tablename__ = "dxa_results"
    __table_args__ = (Index("ix_dxa_results_patient", "patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    dxa_date: Mapped[dt.date] = mapped_column(Date)
    t_lumbar_spine: Mapped[float | None] = mapped_column(Float, nullable=True)
    t_femoral_neck: Mapped[float | None] = mapped_column(Float, nullable=True)
    t_total_hip: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: "hl7", "csv", "fhir" or "manual".
    source: Mapped[str] = mapped_column(String(16))
    #: Where it came from, without patient data: HL7 message control id, file name and line, FHIR
    #: Observation id, or the referral id of a manual entry.
    source_ref: Mapped[str] = mapped_column(String(255), default="")
    actor: Mapped[str] = mapped_column(String(64), default="")
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("dxa_results.id"), nullable=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SiteOperatingPoint(Base):
    """A site operating point of one model version (Device UID), set by an admin
    (osteo_node.operating_point): the thresholds its referrals use.

    Versioned and never updated: each change is a new row with the next `version` for its Device
    UID, and the highest version is in force. While a model has none, its bundle's validated
    thresholds apply. Who set it is also in the audit trail.
    """

    __tablename__ = "operating_points"
    __table_args__ = (UniqueConstraint("device_uid", "version", name="uq_operating_points_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_uid: Mapped[str] = mapped_column(UID)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    low_bmd_threshold: Mapped[float] = mapped_column(Float)
    osteoporosis_threshold: Mapped[float] = mapped_column(Float)
    #: How it was chosen: "target-sensitivity", "flags-per-week", "manual" or "bundle" (back to
    #: the bundle's thresholds).
    basis: Mapped[str] = mapped_column(String(32))
    #: The target sensitivity or flags per week it was chosen for (None for manual and bundle).
    target: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Local DXA pairs behind the choice (and behind `expected`).
    pairs: Mapped[int] = mapped_column(Integer, default=0)
    #: JSON: what the local data says this point gives (sensitivity, specificity, ppv, npv,
    #: flag_rate, flags_per_week), as shown when it was set.
    expected: Mapped[str] = mapped_column(Text, default="{}")
    actor: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ModelAssignment(Base):
    """One change of the live model (`osteo-node model promote` / `rollback`); the newest row is
    in force (osteo_node.roles). No row: the configured `[model] bundle` is live. Rows are never
    updated, so the table is the versioned history of which model was live when."""

    __tablename__ = "model_assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    #: "promote" or "rollback".
    action: Mapped[str] = mapped_column(String(16))
    #: The model made live, by Device UID, and the configured entry (name or folder) it came from.
    live_device_uid: Mapped[str] = mapped_column(UID)
    live_entry: Mapped[str] = mapped_column(Text)
    live_name: Mapped[str] = mapped_column(String(64))
    live_version: Mapped[str] = mapped_column(String(32))
    #: The model that was live before this change (what a rollback returns to).
    previous_device_uid: Mapped[str] = mapped_column(UID)
    reason: Mapped[str] = mapped_column(Text, default="")


class Referral(Base):
    """A patient put on the DXA referral worklist by a screening result (osteo_node.refer).

    The only table that holds patient identifiers (name, ID, birth date, accession number).
    Status changes only through osteo_node.worklist; each change is a ReferralEvent.
    """

    __tablename__ = "referrals"
    __table_args__ = (
        Index("ix_referrals_patient", "patient_id", "issuer_of_patient_id"),
        Index("ix_referrals_status_created", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    risk_category: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(String(32))
    # --- patient and study, copied from the source image's header ---
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    sex: Mapped[str] = mapped_column(String(16), default="")
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, default="")
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    #: PatientTelephoneNumbers (0010,2154) and ReferringPhysicianName: who the coordinator calls.
    patient_phone: Mapped[str] = mapped_column(String(64), default="", server_default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="", server_default="")
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    # --- what caused it: probabilities, model, thresholds ---
    p_normal: Mapped[float] = mapped_column(Float)
    p_osteopenia: Mapped[float] = mapped_column(Float)
    p_osteoporosis: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    device_uid: Mapped[str] = mapped_column(UID)
    osteoporosis_threshold: Mapped[float] = mapped_column(Float)
    low_bmd_threshold: Mapped[float] = mapped_column(Float)
    # --- the coordinator's work: appointment, who works it ---
    appointment_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    assigned_to: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # --- DXA result: a copy of the current `dxa_results` row (`dxa_result_id`); rows there are
    # never updated, a correction supersedes the previous one (osteo_node.dxa) ---
    dxa_result_id: Mapped[int | None] = mapped_column(ForeignKey("dxa_results.id"), nullable=True)
    dxa_t_lumbar_spine: Mapped[float | None] = mapped_column(Float, nullable=True)
    dxa_t_femoral_neck: Mapped[float | None] = mapped_column(Float, nullable=True)
    dxa_t_total_hip: Mapped[float | None] = mapped_column(Float, nullable=True)
    dxa_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ReferralEvent(Base):
    """One line of a referral's history: created, a study attached, a status change, a DXA entry."""

    __tablename__ = "referral_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    referral_id: Mapped[int] = mapped_column(ForeignKey("referrals.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    #: For `attached` and `created`: the image that caused the event (no patient data).
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), nullable=True)


class User(Base):
    """A local account of the web application; the password is stored as an argon2 hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class WebSession(Base):
    """A signed-in browser. The cookie carries a random token; only its SHA-256 is stored here."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class AuditEvent(Base):
    """The security audit trail: who did what to which object, and whether it was allowed.

    Details never carry patient names or IDs: objects are named by their ids.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_object", "object_type", "object_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32), default="")
    object_id: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # let SQLAlchemy's BEGIN below drive transactions
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: Execution options of a connection that only reads: on SQLite its transaction starts with a plain
#: (deferred) BEGIN, which takes no write lock, so that a read never waits on another process's or
#: thread's commit (WAL readers see the last committed state). Other databases ignore it.
READ_ONLY = {"osteo_read_only": True}


def _sqlite_begin(connection: Any) -> None:
    read_only = connection.get_execution_options().get("osteo_read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """One engine per process; SQLite gets WAL, fsync and exclusive-write transactions."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
