"""Which model is live and which are shadows: the one place that answers it (`model_roles`).

The configuration lists the candidates: `[model] bundle` and `[model] shadow` (names of shipped
bundles or bundle folders). With no promotion recorded, `bundle` is live and every `shadow` entry
is a shadow. `osteo-node model promote NAME` makes a shadow live; the model that was live becomes a
shadow (it keeps being screened, so a rollback has fresh results to compare). `rollback` returns
to the model that was live before the latest change. Both append a row to `model_assignments`
(never updated: the table is the history of which model was live when) and an audit event, in one
transaction.

A model is named by its Device UID (bundle.json `device_uid`, new at every export), so a folder
that moves keeps its role, and a re-exported bundle (new weights, new Device UID) is never live by
accident: when the recorded live Device UID matches no configured candidate, the configured
`bundle` is live and a warning says so.

Workers load the live model and the shadows at start. After a promote or rollback they must be
restarted; until then a worker whose model is no longer live stops screening (osteo_node.work).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import audit
from .bundle import read_manifest, resolve_bundle_path
from .config import Settings
from .db import ModelAssignment, utcnow
from .errors import ConfigError, OsteoNodeError

log = logging.getLogger(__name__)

LIVE, SHADOW, RETIRED = "live", "shadow", "retired"
PROMOTE, ROLLBACK = "promote", "rollback"


class RoleError(OsteoNodeError):
    """A promote or rollback cannot be done: the model is not a configured shadow, the name is
    ambiguous, or there is nothing to roll back. The message says which."""


@dataclass(frozen=True)
class ModelRef:
    """A configured model bundle and its role."""

    entry: str  # as configured: a shipped bundle's name or a folder
    name: str
    version: str
    device_uid: str
    role: str  # live or shadow


@dataclass(frozen=True)
class ModelRoles:
    """The live model and the shadows, and the assignment row in force (0: the configuration)."""

    live: ModelRef
    shadows: tuple[ModelRef, ...]
    assignment_id: int

    @property
    def models(self) -> tuple[ModelRef, ...]:
        return (self.live, *self.shadows)

    def role_of(self, device_uid: str) -> str:
        """live, shadow, or retired (a model that produced results but is configured no more)."""
        for model in self.models:
            if model.device_uid == device_uid:
                return model.role
        return RETIRED

    def find(self, name: str) -> ModelRef:
        """The configured model that `name` designates: its configured entry, the folder's name,
        its bundle name, or its Device UID."""
        matches = [m for m in self.models
                   if name in (m.entry, Path(m.entry).name, m.name, m.device_uid)]
        if not matches:
            raise RoleError(f"no configured model is called {name!r}; configured: "
                            + ", ".join(f"{m.entry} ({m.name} {m.version}, {m.role})" for m in self.models))
        if len(matches) > 1:
            raise RoleError(f"{name!r} names several models ({', '.join(m.entry for m in matches)}); "
                            "use the configured entry or the Device UID")
        return matches[0]


def _identity(entry: str) -> tuple[str, str, str]:
    """(name, version, Device UID) from a bundle's manifest (no weights are loaded)."""
    manifest = read_manifest(resolve_bundle_path(entry))
    return str(manifest["name"]), str(manifest["version"]), str(manifest["device_uid"])


def candidates(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(entry, name, version, Device UID) of `[model] bundle` then each `[model] shadow`."""
    found = [(entry, *_identity(entry)) for entry in (settings.model.bundle, *settings.model.shadow)]
    seen: dict[str, str] = {}
    for entry, _, _, device_uid in found:
        if device_uid in seen:
            raise ConfigError(f"model.shadow: {entry!r} is the same model (Device UID {device_uid}) "
                              f"as {seen[device_uid]!r}; list each model once")
        seen[device_uid] = entry
    return found


def _latest(session: Session) -> ModelAssignment | None:
    return session.scalars(select(ModelAssignment).order_by(ModelAssignment.id.desc()).limit(1)).first()


def assignment_version(engine: Engine) -> int:
    """The id of the assignment row in force (0: none); cheap, for workers to notice a change."""
    with Session(engine) as session:
        return int(session.scalar(select(func.max(ModelAssignment.id))) or 0)


def model_roles(settings: Settings, engine: Engine) -> ModelRoles:
    """Which configured model is live and which are shadows, now."""
    found = candidates(settings)
    with Session(engine) as session:
        latest = _latest(session)
        assignment_id = latest.id if latest is not None else 0
        live_uid = latest.live_device_uid if latest is not None else found[0][3]
    if not any(uid == live_uid for *_, uid in found):
        log.warning("the live model recorded by assignment %d (Device UID %s) is not configured any "
                    "more; the configured model.bundle is live", assignment_id, live_uid)
        live_uid = found[0][3]
    refs = [ModelRef(entry, name, version, uid, LIVE if uid == live_uid else SHADOW)
            for entry, name, version, uid in found]
    live = next(ref for ref in refs if ref.role == LIVE)
    return ModelRoles(live, tuple(ref for ref in refs if ref.role == SHADOW), assignment_id)


def _assign(engine: Engine, settings: Settings, target: ModelRef, action: str, actor: str,
            reason: str) -> ModelRoles:
    before = model_roles(settings, engine)
    with Session(engine) as session, session.begin():
        row = ModelAssignment(at=utcnow(), actor=actor[:64], action=action, live_device_uid=target.device_uid,
                              live_entry=target.entry, live_name=target.name[:64],
                              live_version=target.version[:32], previous_device_uid=before.live.device_uid,
                              reason=reason)
        session.add(row)
        session.flush()
        audit.record(session, actor, f"model.{action}", "model", target.device_uid,
                     detail=f"assignment {row.id}: {target.name} {target.version} ({target.entry}) live; "
                            f"was {before.live.name} {before.live.version} ({before.live.device_uid})"
                            + (f"; reason: {reason}" if reason else ""))
    log.info("model %s: %s %s (Device UID %s) is live", action, target.name, target.version, target.device_uid)
    return model_roles(settings, engine)


def promote(settings: Settings, engine: Engine, name: str, *, actor: str, reason: str = "") -> ModelRoles:
    """Make the shadow called `name` the live model (see `ModelRoles.find` for names)."""
    roles = model_roles(settings, engine)
    target = roles.find(name)
    if target.role == LIVE:
        raise RoleError(f"{target.name} {target.version} ({target.entry}) is already live")
    return _assign(engine, settings, target, PROMOTE, actor, reason)


def rollback(settings: Settings, engine: Engine, *, actor: str, reason: str = "") -> ModelRoles:
    """Make live again the model that was live before the latest promote or rollback."""
    roles = model_roles(settings, engine)
    with Session(engine) as session:
        latest = _latest(session)
        previous_uid = latest.previous_device_uid if latest is not None else None
    if previous_uid is None:
        raise RoleError("nothing to roll back: no model has been promoted")
    target = next((m for m in roles.models if m.device_uid == previous_uid), None)
    if target is None:
        raise RoleError(f"the model live before the latest change (Device UID {previous_uid}) is not "
                        "configured any more; add it to model.shadow first")
    if target.role == LIVE:
        raise RoleError(f"{target.name} {target.version} is already live")
    return _assign(engine, settings, target, ROLLBACK, actor, reason)


def history(engine: Engine, limit: int = 20) -> list[ModelAssignment]:
    """The latest assignments, newest first."""
    with Session(engine) as session:
        rows = list(session.scalars(select(ModelAssignment).order_by(ModelAssignment.id.desc()).limit(limit)))
        session.expunge_all()
    return rows
