"""Local accounts and browser sessions: argon2 password hashes, server-side sessions with a signed
random token in the cookie, a per-session CSRF token, roles.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .. import audit
from ..db import AuditEvent, User, WebSession, utcnow

COORDINATOR, ADMIN = "coordinator", "admin"
ROLES = (COORDINATOR, ADMIN)
MIN_PASSWORD_LENGTH = 12
#: Failed logins for one name within LOCKOUT_MINUTES that block further attempts.
MAX_FAILED_LOGINS, LOCKOUT_MINUTES = 5, 15

_hasher = PasswordHasher()


class AuthError(ValueError):
    """An account request is invalid (unknown role, weak password, duplicate name)."""


@dataclass(frozen=True)
class SignedIn:
    """The user behind a request's session."""

    user_id: int
    name: str
    role: str
    csrf_token: str
    session_id: int

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def add_user(session: Session, name: str, role: str, password: str) -> User:
    """Create an account; AuthError names what is wrong."""
    name = name.strip()
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise AuthError(f"user name must be 1-64 letters, digits, '.', '-' or '_'; got {name!r}")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AuthError(f"user {name!r} already exists")
    user = User(name=name, role=role, password_hash=hash_password(password), created_at=utcnow(),
                disabled=False)
    session.add(user)
    session.flush()
    return user


def set_disabled(session: Session, user: User, disabled: bool, *, actor: str) -> None:
    """Disable (or enable again) an account, audited; its open sessions end at once."""
    user.disabled = disabled
    if disabled:
        session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    audit.record(session, actor, "user.disable" if disabled else "user.enable", "user", user.name)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Creates, reads and ends sessions; the cookie value is `serializer`-signed."""

    def __init__(self, secret_key: str, minutes: int) -> None:
        self.serializer = URLSafeSerializer(secret_key, salt="osteo-node-session")
        self.minutes = minutes

    def recent_failures(self, session: Session, name: str, now: dt.datetime) -> int:
        since = now - dt.timedelta(minutes=LOCKOUT_MINUTES)
        return int(session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "login", AuditEvent.outcome == "failure",
            AuditEvent.object_id == name[:64], AuditEvent.at >= since)) or 0)

    def authenticate(self, session: Session, name: str, password: str) -> User | None:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            _hasher.hash(password)  # same work as a real check: no timing hint about names
            return None
        if not verify_password(user.password_hash, password) or user.disabled:
            return None
        return user

    def start(self, session: Session, user: User) -> str:
        """A new session for `user`; returns the cookie value."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        session.execute(delete(WebSession).where(WebSession.expires_at < now))
        session.add(WebSession(token_hash=_token_hash(token), user_id=user.id,
                               csrf_token=secrets.token_urlsafe(32), created_at=now,
                               expires_at=now + dt.timedelta(minutes=self.minutes)))
        return str(self.serializer.dumps(token))

    def _token(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            token = self.serializer.loads(cookie)
        except BadSignature:
            return None
        return token if isinstance(token, str) else None

    def current(self, session: Session, cookie: str | None) -> SignedIn | None:
        """The signed-in user, extending the session (idle timeout); None when absent or expired."""
        token = self._token(cookie)
        if token is None:
            return None
        row = session.scalar(select(WebSession).where(WebSession.token_hash == _token_hash(token)))
        now = utcnow()
        if row is None or row.expires_at <= now:
            return None
        user = session.get(User, row.user_id)
        if user is None or user.disabled:
            return None
        row.expires_at = now + dt.timedelta(minutes=self.minutes)
        return SignedIn(user.id, user.name, user.role, row.csrf_token, row.id)

    def end(self, session: Session, cookie: str | None) -> None:
        token = self._token(cookie)
        if token is not None:
            session.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(token)))


def csrf_ok(expected: str, received: str | None) -> bool:
    return bool(received) and hmac.compare_digest(expected.encode(), str(received).encode())
