"""Local accounts and browser sessions: argon2 password hashes, server-side sessions with a signed
random token in the cookie, a per-session CSRF token, roles; the password policy; the login
throttle; unlock, reset and change of passwords.

Failed logins are throttled three ways, so that an attacker can neither guess passwords nor lock
a real user out:

* per client address (`LoginThrottle`, in memory): after MAX_FAILED_PER_CLIENT failures in
  LOCKOUT_MINUTES the address gets 429 without a password check (no argon2 work for a flood);
* per account (the audit trail, shared by every process): after MAX_FAILED_LOGINS failures from
  unknown browsers in LOCKOUT_MINUTES the account refuses unknown browsers until the window
  passes or an admin unlocks it;
* per known browser: a browser that signed in as that user before carries a signed device
  cookie; it skips both locks above and has its own counter (MAX_FAILED_LOGINS). So an anonymous
  flood cannot keep the real user out of their own browser, and a signed-in session is never
  touched by any of this.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .. import audit
from ..db import AuditEvent, User, WebSession, utcnow

COORDINATOR, ADMIN = "coordinator", "admin"
ROLES = (COORDINATOR, ADMIN)
MIN_PASSWORD_LENGTH = 12
#: zxcvbn's score (0-4, "guesses" on a log scale) a password needs: 3 is "safely unguessable:
#: moderate protection from offline slow-hash scenario" (~10^10 guesses).
MIN_PASSWORD_SCORE = 3
#: Failed logins for one name (from unknown browsers) within LOCKOUT_MINUTES that block further
#: attempts from unknown browsers; the same number per known browser.
MAX_FAILED_LOGINS, LOCKOUT_MINUTES = 5, 15
#: Failed logins from one client address within LOCKOUT_MINUTES before it gets 429.
MAX_FAILED_PER_CLIENT = 20
#: Audit actions after which an account's earlier failures no longer count.
UNLOCK_ACTIONS = ("user.unlock", "user.reset", "user.passwd")

_hasher = PasswordHasher()
#: At most this many argon2 computations at once (each ~0.5 s of one core, 64 MiB): a login flood
#: queues here instead of taking every core from the pages of signed-in users.
_HASH_SLOTS = threading.BoundedSemaphore(1)


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
    with _HASH_SLOTS:
        return _hasher.hash(password)


#: Seconds the last 20 password checks took; an attempt for an unknown name waits their median
#: instead of hashing, so it costs no CPU and gives about the same timing as a real check.
_check_seconds: list[float] = []


def verify_password(password_hash: str, password: str) -> bool:
    start = time.perf_counter()
    try:
        with _HASH_SLOTS:
            start = time.perf_counter()
            return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
    finally:
        _check_seconds[:] = [*_check_seconds[-19:], time.perf_counter() - start]


def pretend_to_verify(password: str) -> None:
    """As long as a real check, for a name that has no account (little hint that it does not
    exist); asleep rather than hashing once real checks have been timed, so that a flood of
    made-up names costs no CPU. Under a flood a real check may also wait for its hashing slot,
    which the sleep does not: the per-client throttle bounds how much an attacker can probe."""
    if len(_check_seconds) < 3:
        if not _dummy_hash:
            _dummy_hash.append(hash_password("not a password of anyone: timing reference"))
        verify_password(_dummy_hash[0], password)
        return
    time.sleep(sorted(_check_seconds)[len(_check_seconds) // 2])


_dummy_hash: list[str] = []


def check_password(password: str, name: str = "") -> None:
    """The password policy: MIN_PASSWORD_LENGTH characters and a zxcvbn score of at least
    MIN_PASSWORD_SCORE (dictionary words, names, keyboard walks, dates, repeats and the user's own
    name count against it); AuthError says what is wrong and how to do better."""
    from zxcvbn import zxcvbn  # type: ignore[import-untyped]

    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > 256:
        raise AuthError("password must be at most 256 characters")
    verdict = zxcvbn(password[:100], user_inputs=[name, "osteo", "osteo-node", "dxa", "hospital"])
    if verdict["score"] < MIN_PASSWORD_SCORE:
        feedback = verdict.get("feedback") or {}
        hints = [feedback.get("warning") or "", *(feedback.get("suggestions") or [])]
        hint = " ".join(h for h in hints if h) or "Use a few uncommon words."
        raise AuthError(f"password is too easy to guess: {hint}")


def add_user(session: Session, name: str, role: str, password: str) -> User:
    """Create an account; AuthError names what is wrong."""
    name = name.strip()
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise AuthError(f"user name must be 1-64 letters, digits, '.', '-' or '_'; got {name!r}")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    check_password(password, name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AuthError(f"user {name!r} already exists")
    user = User(name=name, role=role, password_hash=hash_password(password), created_at=utcnow(),
                disabled=False)
    session.add(user)
    session.flush()
    return user


def find_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AuthError(f"no user {name!r}")
    return user


def set_password(session: Session, user: User, password: str, *, actor: str,
                 action: str = "user.reset") -> None:
    """Give `user` a new password (policy-checked), end their sessions, lift a lock; audited as
    `action` (user.reset by an admin or the CLI, user.passwd by the user)."""
    check_password(password, user.name)
    user.password_hash = hash_password(password)
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    audit.record(session, actor, action, "user", user.name)


def change_own_password(session: Session, user: User, current: str, new: str) -> None:
    """A user's own change: the current password is checked first (AuthError when wrong)."""
    if not verify_password(user.password_hash, current):
        raise AuthError("the current password is wrong")
    if current == new:
        raise AuthError("the new password must differ from the current one")
    set_password(session, user, new, actor=user.name, action="user.passwd")


def unlock(session: Session, user: User, *, actor: str) -> None:
    """Forget the account's failed logins (audited; recent_failures counts from here)."""
    audit.record(session, actor, "user.unlock", "user", user.name)


def set_role(session: Session, user: User, role: str, *, actor: str) -> None:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    if user.role != role:
        audit.record(session, actor, "user.role", "user", user.name, detail=f"{user.role} -> {role}")
        user.role = role


class LoginThrottle:
    """Failed-login counters per client address and per known browser, in this process's memory
    (a restart forgets them; the per-account lock lives in the audit trail instead)."""

    def __init__(self, per_client: int = MAX_FAILED_PER_CLIENT, per_device: int = MAX_FAILED_LOGINS,
                 window_s: float = LOCKOUT_MINUTES * 60,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_client, self.per_device, self.window_s, self.clock = per_client, per_device, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._reported: dict[str, float] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str, device: str | None) -> int:
        """Seconds until this client (or known browser) may try again; 0 when it may now."""
        key, limit = (f"device:{device}", self.per_device) if device else (f"client:{client}", self.per_client)
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            if len(times) < limit:
                return 0
            return max(1, int(times[-limit] + self.window_s - now) + 1)

    def report_due(self, client: str, device: str | None, every_s: float = 60.0) -> bool:
        """Whether a refused attempt of this client should be audited now: once a minute per
        client, so that a flood of refusals does not become a flood of database writes."""
        key = f"device:{device}" if device else f"client:{client}"
        with self._lock:
            now = self.clock()
            if now - self._reported.get(key, -every_s - 1) < every_s:
                return False
            self._reported[key] = now
            if len(self._reported) > 10_000:
                self._reported = {k: t for k, t in self._reported.items() if now - t < every_s}
            return True

    def failed(self, client: str, device: str | None) -> None:
        key = f"device:{device}" if device else f"client:{client}"
        with self._lock:
            now = self.clock()
            self._recent(key, now).append(now)
            if len(self._failures) > 10_000:  # a flood of addresses: drop the idle ones
                for stale in [k for k, v in self._failures.items() if not v or v[-1] <= now - self.window_s]:
                    del self._failures[stale]


def set_disabled(session: Session, user: User, disabled: bool, *, actor: str) -> None:
    """Disable (or enable again) an account, audited; its open sessions end at once."""
    user.disabled = disabled
    if disabled:
        session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    audit.record(session, actor, "user.disable" if disabled else "user.enable", "user", user.name)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: Audit detail of a failed login from a known browser (not counted against the account).
KNOWN_DEVICE = "known device"
#: How long a stale session row is kept after it expired, so that a form posted after expiry can
#: be resumed after signing in again (its CSRF token proves the form came from our page).
STALE_KEEP = dt.timedelta(hours=12)


class Sessions:
    """Creates, reads and ends sessions; the cookie value is `serializer`-signed.

    The idle timeout slides: each request of a signed-in user moves the expiry `minutes` ahead.
    """

    def __init__(self, secret_key: str, minutes: int) -> None:
        self.serializer = URLSafeSerializer(secret_key, salt="osteo-node-session")
        self.devices = URLSafeSerializer(secret_key, salt="osteo-node-device")
        self.minutes = minutes

    def device_cookie(self, name: str) -> str:
        """The cookie that makes this browser a known one for `name`."""
        return str(self.devices.dumps({"u": name, "n": secrets.token_urlsafe(12)}))

    def known_device(self, cookie: str | None, name: str) -> str | None:
        """The device id when `cookie` was issued to a browser that signed in as `name`."""
        if not cookie:
            return None
        try:
            value = self.devices.loads(cookie)
        except BadSignature:
            return None
        if not isinstance(value, dict) or value.get("u") != name or not isinstance(value.get("n"), str):
            return None
        return str(value["n"])

    def recent_failures(self, session: Session, name: str, now: dt.datetime) -> int:
        """Failed logins for `name` from unknown browsers in the last LOCKOUT_MINUTES, counted
        from the last unlock, reset or password change."""
        since = now - dt.timedelta(minutes=LOCKOUT_MINUTES)
        lifted = session.scalar(select(func.max(AuditEvent.at)).where(
            AuditEvent.action.in_(UNLOCK_ACTIONS), AuditEvent.object_type == "user",
            AuditEvent.object_id == name[:64], AuditEvent.outcome == "success"))
        if lifted is not None and lifted > since:
            since = lifted
        return int(session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "login", AuditEvent.outcome == "failure",
            AuditEvent.object_id == name[:64], AuditEvent.at >= since,
            or_(AuditEvent.detail != KNOWN_DEVICE, AuditEvent.detail.is_(None)))) or 0)

    def authenticate(self, engine: Engine, name: str, password: str) -> int | None:
        """The id of the active user `name` when `password` is theirs, else None.

        The argon2 check runs outside any database transaction: SQLite transactions here take the
        write lock (db.py), and holding it for half a second per login attempt queued every other
        request behind a login flood (measured: a 27 s page)."""
        with Session(engine) as session:
            user = session.scalar(select(User).where(User.name == name))
            found = (user.id, user.password_hash, user.disabled) if user is not None else None
        if found is None:
            pretend_to_verify(password)
            return None
        user_id, password_hash, disabled = found
        if not verify_password(password_hash, password) or disabled:
            return None
        return user_id

    def start(self, session: Session, user: User) -> str:
        """A new session for `user`; returns the cookie value."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        session.execute(delete(WebSession).where(WebSession.expires_at < now - STALE_KEEP))
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

    def stale_csrf(self, session: Session, cookie: str | None) -> tuple[str, str] | None:
        """(user name, CSRF token) of the expired session behind `cookie`, None otherwise."""
        token = self._token(cookie)
        if token is None:
            return None
        row = session.scalar(select(WebSession).where(WebSession.token_hash == _token_hash(token)))
        if row is None:
            return None
        user = session.get(User, row.user_id)
        return (user.name, row.csrf_token) if user is not None else None

    def end(self, session: Session, cookie: str | None) -> None:
        token = self._token(cookie)
        if token is not None:
            session.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(token)))


def csrf_ok(expected: str, received: str | None) -> bool:
    return bool(received) and hmac.compare_digest(expected.encode(), str(received).encode())
