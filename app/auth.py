"""Optional login for the page and the HTTP API.

Users come from `app.users` in the settings (bcrypt hashes) or from environment variables
ZHIWEN_PASSWORD_<USERNAME> (plain text, for a container secret; the username upper-cased, '-' and '.' as '_').
The same check guards the Gradio page (its login form) and the API (HTTP Basic).

Failed logins are counted per user name and per client address (`LoginLimiter`): past app.login_max_failures /
app.login_max_failures_per_address within app.login_lockout_s, that name or address is refused until the window has
passed since its last failure. A verified password is remembered for app.auth_cache_s (as a keyed hash, in memory),
so an HTTP Basic client pays one bcrypt check (~0.25 s of CPU), not one per request.

    python -m app.auth hash            # asks for a password twice, prints a bcrypt hash for configs/*.yaml
    echo 's3cret' | python -m app.auth hash --stdin
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable

import anyio.to_thread
import bcrypt
from cachetools import TTLCache

from configs import Settings

ENV_PREFIX = "ZHIWEN_PASSWORD_"


class AuthConfigError(ValueError):
    """Login is enabled but no usable user is configured; the message says what to set."""


def env_var_for(username: str) -> str:
    """The environment variable holding `username`'s password: env_var_for("li.ming") -> "ZHIWEN_PASSWORD_LI_MING"."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", username).upper()


def hash_password(password: str) -> str:
    """A bcrypt hash (cost 12) of `password`, as text for a YAML file."""
    if not password:
        raise ValueError("the password is empty; choose a non-empty password")
    # bcrypt only looks at the first 72 bytes; bcrypt 5 raises beyond that, so refuse clearly instead.
    if len(password.encode("utf-8")) > 72:
        raise ValueError("the password is longer than 72 bytes, which bcrypt cannot hash; choose a shorter one")
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=12)).decode("ascii")


def _check_hash(password: str, password_hash: str) -> bool:
    try:
        pw = password.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: never a match
        return False
    if len(pw) > 72:
        return False
    try:
        return bcrypt.checkpw(pw, password_hash.encode("ascii"))
    except ValueError:  # a malformed hash in the settings: never a match
        return False


class LoginLimiter:
    """Counts failed logins per key ("user:<name>", "addr:<ip>"); a key past its limit is blocked until `window_s`
    after its last counted failure. Memory is bounded: the oldest keys are forgotten first."""

    def __init__(self, max_user: int, max_address: int, window_s: float, maxsize: int = 100_000) -> None:
        self._limits = {"user": max_user, "addr": max_address}
        self.window_s = window_s
        self._failures: TTLCache[str, int] = TTLCache(maxsize=maxsize, ttl=window_s)
        self._lock = threading.Lock()

    def _keys(self, username: str | None, address: str | None) -> list[tuple[str, str]]:
        return [(kind, f"{kind}:{value}") for kind, value in (("user", username), ("addr", address))
                if value is not None]

    def blocked(self, username: str | None = None, address: str | None = None) -> bool:
        with self._lock:
            return any(self._failures.get(key, 0) >= self._limits[kind] for kind, key in self._keys(username, address))

    def failed(self, username: str | None = None, address: str | None = None) -> None:
        with self._lock:
            for _kind, key in self._keys(username, address):
                self._failures[key] = self._failures.get(key, 0) + 1  # re-inserting restarts the key's window


class Authenticator:
    """verify(username, password, address=None) -> bool, against the settings' users and ZHIWEN_PASSWORD_*
    variables, with failed logins limited (`limiter`) and verified passwords remembered for app.auth_cache_s."""

    def __init__(self, settings: Settings, environ: dict[str, str] | None = None) -> None:
        self.enabled = settings.app.auth_enabled
        a = settings.app
        self.limiter = LoginLimiter(a.login_max_failures, a.login_max_failures_per_address, a.login_lockout_s)
        # keyed by an HMAC of (user, password) under a per-process secret: the memory never holds a password
        self._verified: TTLCache[bytes, bool] | None = (
            TTLCache(maxsize=10_000, ttl=a.auth_cache_s) if a.auth_cache_s > 0 else None)
        self._cache_key = secrets.token_bytes(32)
        self._cache_lock = threading.Lock()
        env = os.environ if environ is None else environ
        self._hashes: dict[str, str] = {}
        self._plain: dict[str, str] = {}
        for user in settings.app.users:
            if user.password_hash:
                if not user.password_hash.startswith("$2"):
                    raise AuthConfigError(
                        f"app.users: the password_hash of user {user.username!r} is not a bcrypt hash "
                        f"(it should start with '$2b$'); create one with `python -m app.auth hash`"
                    )
                self._hashes[user.username] = user.password_hash
            elif env.get(env_var_for(user.username)):
                self._plain[user.username] = env[env_var_for(user.username)]
            elif self.enabled:
                raise AuthConfigError(
                    f"app.users: user {user.username!r} has no password_hash and {env_var_for(user.username)} "
                    f"is not set; add a hash from `python -m app.auth hash` or set that variable"
                )
        if self.enabled and not (self._hashes or self._plain):
            raise AuthConfigError(
                "app.auth_enabled is true but app.users is empty; add users with a password_hash "
                "(`python -m app.auth hash`) or set app.auth_enabled to false"
            )

    def blocked(self, username: str | None = None, address: str | None = None) -> bool:
        """True while this user name or client address has too many recent failed logins."""
        return self.enabled and self.limiter.blocked(username, address)

    def verify(self, username: str, password: str, address: str | None = None) -> bool:
        """The password is right and neither the name nor the address is blocked. A failure counts for both."""
        if not self.enabled:
            return True
        if self.limiter.blocked(username, address):
            return False
        key = hmac.new(self._cache_key, f"{username}\0{password}".encode("utf-8", "surrogatepass"),
                       hashlib.sha256).digest()
        if self._verified is not None:
            with self._cache_lock:
                if self._verified.get(key):
                    return True
        ok = self._check(username, password)
        if not ok:
            self.limiter.failed(username, address)
        elif self._verified is not None:
            with self._cache_lock:
                self._verified[key] = True
        return ok

    def _check(self, username: str, password: str) -> bool:
        if username in self._hashes:
            return _check_hash(password, self._hashes[username])
        if username in self._plain:
            # Constant-time comparison: the answer time must not reveal how much of the password matched.
            return hmac.compare_digest(password.encode("utf-8", "surrogatepass"),
                                       self._plain[username].encode("utf-8"))
        # Unknown user: still spend a bcrypt check so that timing does not reveal which usernames exist.
        _check_hash(password, "$2b$12$" + "." * 53)
        return False

    def gradio_auth(self) -> Callable[[str, str], bool] | None:
        """What Gradio's `auth=` expects: None when login is off. Gradio does not pass the client address; the
        per-address limit on the page's login form is `LoginAddressGuard` in app/server.py."""
        if not self.enabled:
            return None

        async def gradio_verify(username: str, password: str) -> bool:
            # Gradio awaits a coroutine function; bcrypt (~0.25 s of CPU) then runs off the event loop
            return await anyio.to_thread.run_sync(self.verify, username, password)

        return gradio_verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.auth", description="Zhiwen login helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="print a bcrypt hash of a password for app.users[].password_hash")
    h.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    args = parser.parse_args(argv)
    if args.command == "hash":
        if args.stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("The two passwords differ; nothing was printed. Run the command again.", file=sys.stderr)
                return 1
        try:
            print(hash_password(password))
        except ValueError as e:
            print(f"Cannot hash this password: {e}.", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
