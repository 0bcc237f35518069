"""Users, roles, passwords and time-bound API tokens (stored as SHA-256 hashes)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from pwdlib import PasswordHash
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.domain.errors import Conflict, Invalid, NotAuthenticated, PermissionDenied, RateLimited
from helpline.runtime.core import Core, now
from helpline.store.models import ApiToken, LoginFailure, User

ALL_SITES = "*"
# A phone extension (the Asterisk queue interface is made from it): nothing that could break an AMI line.
EXTENSION = re.compile(r"[A-Za-z0-9_.+*#-]{1,32}")
# A request-signing secret (helpline.api.signing): long, and free of the "," that joins "new,old".
SIGNING_SECRET = re.compile(r"[A-Za-z0-9_.~+/=-]{32,100}")


class Role(StrEnum):
    CHATBOT = "chatbot"
    COUNSELOR = "counselor"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"


_hasher = PasswordHash.recommended()
# Verified against when the username is unknown, so both paths cost the same time.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    id: int
    username: str
    role: Role
    site: str
    name: str
    # The HMAC secret(s) this account signs its requests with (the previous one too while rotating);
    # empty: it does not sign. Carried here so the principal cache spares a lookup per request.
    signing_secrets: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def may_use_site(self, slug: str) -> bool:
        return self.role == Role.ADMIN or self.site in (ALL_SITES, slug)

    def require_role(self, *roles: Role) -> None:
        if self.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise PermissionDenied(f"this call is for the role(s) {allowed}, not {self.role.value}")

    def require_site(self, slug: str) -> None:
        if not self.may_use_site(slug):
            raise PermissionDenied(f"this account may not act for site {slug!r}")


STAFF = (Role.COUNSELOR, Role.SUPERVISOR, Role.ADMIN)
"""The roles that work conversations (and may read them)."""


def require_chatbot(who: Principal, path_site: str | None) -> None:
    """A chatbot (or admin), and allowed to act for the site named in the path, if any
    (``/sites/<slug>/...``). Checked before anything is looked up (a repeat's first answer
    included): an account bound to one site gets 403 for another site's path."""
    who.require_role(Role.CHATBOT, Role.ADMIN)
    if path_site is not None:
        who.require_site(path_site)


def _principal(user: User) -> Principal:
    return Principal(
        user.id, user.username, Role(user.role), user.site, user.name, signing_secrets_of(user.signing_secret)
    )


def signing_secrets_of(value: str | None) -> tuple[str, ...]:
    """The secrets of a ``users.signing_secret`` value: ``"new"`` or ``"new,old"`` while rotating."""
    return tuple(s for s in (value or "").split(",") if s)


def new_signing_secret() -> str:
    """A fresh signing secret: 256 random bits, URL-safe, with a prefix that secret scanners can spot."""
    return "hls_" + secrets.token_urlsafe(32)


def _check_signing_secret(secret: str, role: Role) -> None:
    if role != Role.CHATBOT:
        raise Invalid("only chatbot accounts sign their requests")
    if not SIGNING_SECRET.fullmatch(secret):
        raise Invalid("a signing secret is 32..100 of A-Z a-z 0-9 _ . ~ + / = -")


async def create_user(
    core: Core,
    *,
    username: str,
    password: str,
    role: Role,
    site: str | None = None,
    name: str | None = None,
    extension: str | None = None,
    signing_secret: str | None = None,
) -> Principal:
    if not username or len(username) > 150:
        raise Invalid("username must be 1..150 characters")
    if extension is not None and not EXTENSION.fullmatch(extension):
        raise Invalid("extension must be 1..32 of A-Z a-z 0-9 _ . + * # -")
    if len(password) < 8:
        raise Invalid("password must be at least 8 characters")
    if signing_secret is not None:
        _check_signing_secret(signing_secret, role)
    slug = site or core.sites.default.slug
    if slug != ALL_SITES and core.sites.get(slug) is None:
        raise Invalid(f"unknown site {slug!r}")
    async with core.tx() as tx:
        exists = await tx.session.scalar(select(User.id).where(User.username == username))
        if exists is not None:
            raise Conflict(f"user {username!r} exists already")
        user = User(
            username=username,
            password_hash=_hasher.hash(password),
            role=role.value,
            site=slug,
            name=name or username,
            active=True,
            created_at=now(),
            extension=extension,
            signing_secret=signing_secret,
        )
        tx.session.add(user)
        await tx.session.flush()
        return _principal(user)


async def _check_rate(session: AsyncSession, core: Core, keys: list[str], t: float) -> None:
    window = core.settings.login_window_s
    for key in keys:
        count, oldest = (
            await session.execute(
                select(func.count(), func.min(LoginFailure.at)).where(
                    LoginFailure.key == key, LoginFailure.at > t - window
                )
            )
        ).one()
        if count >= core.settings.login_max_failures:
            raise RateLimited(
                "too many failed login attempts; try again later",
                retry_after=max(1.0, float(oldest) + window - t),
            )


async def issue_token(core: Core, *, username: str, password: str, address: str) -> tuple[str, float]:
    """Check the credentials and return ``(token, expires_at)``; the token itself is never stored."""
    t = now()
    keys = [f"user:{username}", f"addr:{address}"]
    async with core.tx() as tx:
        await _check_rate(tx.session, core, keys, t)
        user = await tx.session.scalar(select(User).where(User.username == username))
    # Hash checks are slow: done outside the transaction so they hold no lock.
    ok = _hasher.verify(password, user.password_hash if user else _DUMMY_HASH)
    async with core.tx() as tx:
        if not ok or user is None or not user.active:
            tx.session.add_all([LoginFailure(key=k, at=t) for k in keys])
            await tx.session.execute(delete(LoginFailure).where(LoginFailure.at <= t - core.settings.login_window_s))
        else:
            await tx.session.execute(delete(LoginFailure).where(LoginFailure.key == keys[0]))
            token = secrets.token_hex(20)
            expires_at = t + core.settings.token_ttl_s
            tx.session.add(ApiToken(key_hash=hash_token(token), user_id=user.id, created_at=t, expires_at=expires_at))
            return token, expires_at
    raise NotAuthenticated("invalid username or password")


async def issue_service_token(core: Core, *, username: str, ttl_s: float) -> tuple[str, float]:
    """A token for a machine client (a Weni project's ``api_token``), valid ``ttl_s`` seconds.

    Issued by an operator (``helpline issuetoken``), not by a password; stored hashed and revocable
    like any other (``DELETE /api/token/``). Two tokens of one user are valid together, so a token is
    rotated by issuing the new one, switching the client over, then revoking the old one.
    """
    if ttl_s <= 0:
        raise Invalid("the lifetime must be positive")
    t = now()
    async with core.tx() as tx:
        user = await tx.session.scalar(select(User).where(User.username == username))
        if user is None or not user.active:
            raise Invalid(f"no active user {username!r}")
        token = secrets.token_hex(20)
        expires_at = t + ttl_s
        tx.session.add(ApiToken(key_hash=hash_token(token), user_id=user.id, created_at=t, expires_at=expires_at))
        return token, expires_at


# A valid token's principal is remembered this long by the instance that checked it, so a chatbot's
# stream of calls costs one lookup every few seconds, not one per request. Revoking on this
# instance forgets it at once; another instance honours a revocation within this delay.
AUTH_CACHE_S = 5.0
_AUTH_CACHE_MAX = 10_000


@dataclass
class PrincipalCache:
    """This instance's principals by sha256(token), each remembered until a time; and the lookups in
    flight (one per token at a time). A component of the core (``PrincipalCache.of(core)``)."""

    entries: dict[str, tuple[Principal, float]] = field(default_factory=dict)
    pending: dict[str, asyncio.Future[Principal]] = field(default_factory=dict)

    @staticmethod
    def of(core: Core) -> PrincipalCache:
        return core.component(PrincipalCache, lambda _core: PrincipalCache())

    def forget_user(self, user_id: int) -> None:
        for key, (cached, _) in list(self.entries.items()):
            if cached.id == user_id:
                self.entries.pop(key, None)


async def authenticate(core: Core, token: str) -> Principal:
    if len(token) != 40 or any(c not in "0123456789abcdef" for c in token):
        raise NotAuthenticated("invalid token")
    key = hash_token(token)
    t = now()
    cache = PrincipalCache.of(core)
    cached = cache.entries.get(key)
    if cached is not None and cached[1] > t:
        return cached[0]
    # One lookup per token at a time: when a busy chatbot's entry expires, its concurrent
    # requests wait for the first one's answer instead of each reading the database.
    pending = cache.pending.get(key)
    if pending is not None:
        return await asyncio.shield(pending)
    task = asyncio.ensure_future(_look_up(core, key, t))
    cache.pending[key] = task
    try:
        return await asyncio.shield(task)
    finally:
        if task.done():
            cache.pending.pop(key, None)
        else:
            task.add_done_callback(lambda _t: cache.pending.pop(key, None))


async def _look_up(core: Core, key: str, t: float) -> Principal:
    async with core.sessionmaker() as session:
        row = (
            await session.execute(
                select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.key_hash == key)
            )
        ).first()
    if row is None:
        raise NotAuthenticated("invalid token")
    tok, user = row
    if tok.revoked_at is not None:
        raise NotAuthenticated("token revoked")
    if tok.expires_at <= t:
        raise NotAuthenticated("token expired")
    if not user.active:
        raise NotAuthenticated("account disabled")
    who = _principal(user)
    entries = PrincipalCache.of(core).entries
    if len(entries) >= _AUTH_CACHE_MAX:
        entries.clear()
    entries[key] = (who, min(t + AUTH_CACHE_S, tok.expires_at))
    return who


async def revoke_token(core: Core, token: str) -> bool:
    PrincipalCache.of(core).entries.pop(hash_token(token), None)
    async with core.tx() as tx:
        tok = await tx.session.scalar(select(ApiToken).where(ApiToken.key_hash == hash_token(token)))
        if tok is None or tok.revoked_at is not None:
            return False
        tok.revoked_at = now()
        return True


async def set_signing_secret(
    core: Core, *, username: str, secret: str | None, keep_previous: bool = False
) -> Principal:
    """Set, rotate or clear (``None``) the secret a chatbot account signs its requests with.

    ``keep_previous``: the current secret stays valid beside the new one (``"new,old"``), so the
    client can switch over without a refused request; set again without it to drop the old one.
    This instance forgets the account's cached principals at once; others within ``AUTH_CACHE_S``.
    """
    async with core.tx() as tx:
        user = await tx.session.scalar(select(User).where(User.username == username))
        if user is None:
            raise Invalid(f"no user {username!r}")
        if secret is not None:
            _check_signing_secret(secret, Role(user.role))
            previous = signing_secrets_of(user.signing_secret)[:1]
            kept = [p for p in previous if keep_previous and p != secret]
            user.signing_secret = ",".join([secret, *kept])
        else:
            user.signing_secret = None
        who = _principal(user)
    PrincipalCache.of(core).forget_user(who.id)
    return who
