"""Who may call the app: one shared token and/or named client keys.

The shared token comes from `RDM_API_TOKEN` or `api_token_file`. Client keys live in `api_keys_file`, a JSON
file `{"keys": {"<client>": "sha256:<hex digest of its key>"}}` that holds only digests (the keys are random
and long, so a plain SHA-256 is enough), written by `rdm keys add|revoke`. The app reads the file again when it
changes, so a key added or revoked takes effect without a redeploy; a file that cannot be parsed leaves the
keys it had in force (logged), never none. Each request is attributed to its client: the request metric's
`client` tag and every image's metadata name it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from cluster.errors import ObjectNotFoundError, StorageError
from cluster.storage import LocalStore, ObjectStore
from rdm.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

TOKEN_ENV = "RDM_API_TOKEN"
SHARED_CLIENT = "shared"  # the client name of the shared token
CLIENT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
PREFIX = "sha256:"


def read_token_file(path: str | None) -> str | None:
    """The token in `path` (None without a path); a file that cannot be read, or is empty, is a ConfigError."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"api_token_file {path}: cannot be read ({err.strerror}); mount it on every node that may "
                          f"run an Ingress replica, or set {TOKEN_ENV}") from None
    if not token:
        raise ConfigError(f"api_token_file {path} is empty")
    return token


def digest(key: str) -> str:
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | Path) -> dict[str, str]:
    """{client: digest} of a keys file; a missing, malformed or empty-keyed file is a ConfigError."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"api_keys_file {path}: cannot be read ({err.strerror})") from None
    except ValueError as err:
        raise ConfigError(f"api_keys_file {path}: not JSON ({err})") from None
    keys = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(keys, dict):
        raise ConfigError(f'api_keys_file {path}: expected {{"keys": {{"<client>": "sha256:<hex>"}}}}')
    for client, value in keys.items():
        if not CLIENT_NAME.match(client) or not (isinstance(value, str) and re.fullmatch(PREFIX + "[0-9a-f]{64}", value)):
            raise ConfigError(f"api_keys_file {path}: entry {client!r} needs a name of [a-z0-9._-] and a "
                              f"'sha256:<64 hex digits>' digest")
    return dict(keys)


def write_keys(path: str | Path, keys: dict[str, str]) -> None:
    """Replace the keys file through a temporary file (mode 0600) and a rename: a reader sees the old or the
    new file."""
    path = Path(path)
    LocalStore(path.parent).write_bytes(path.name, json.dumps({"keys": dict(sorted(keys.items()))}, indent=1).encode())


def add_key(path: str | Path, client: str) -> str:
    """Create a key for `client` (a new file if there is none) and return it: it is shown only this once."""
    if not CLIENT_NAME.match(client):
        raise InputError(f"client name {client!r}: use 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit")
    keys = read_keys(path) if Path(path).exists() else {}
    if client in keys:
        raise InputError(f"client {client!r} already has a key in {path}; revoke it first to replace it")
    key = secrets.token_urlsafe(32)
    write_keys(path, {**keys, client: digest(key)})
    return key


def revoke_key(path: str | Path, client: str) -> None:
    keys = read_keys(path)
    if client not in keys:
        raise InputError(f"no key for client {client!r} in {path} (clients: {', '.join(sorted(keys)) or 'none'})")
    write_keys(path, {k: v for k, v in keys.items() if k != client})


class Authenticator:
    """Maps a bearer token to its client name: the shared token, or a key of `keys_file` (re-read when the
    file changes)."""

    def __init__(self, shared_token: str | None, keys_file: str | None) -> None:
        self.shared, self.keys_file = shared_token, keys_file
        self._keys: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        if keys_file is not None:
            self._keys = read_keys(keys_file)  # a bad file at start is a deploy error
            self._stamp = self._file_stamp()

    @property
    def enabled(self) -> bool:
        return self.shared is not None or self.keys_file is not None

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.keys_file)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_ino  # a k8s secret update swaps the file (new inode)

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            self._keys = read_keys(self.keys_file)
        except ConfigError as err:
            logger.error("keeping the %d client keys in force: %s", len(self._keys), err)
        self._stamp = stamp

    def client(self, token: str) -> str | None:
        """The client the token belongs to, or None. Compares in constant time against every key."""
        found = None
        if self.shared is not None and hmac.compare_digest(token.encode(), self.shared.encode()):
            found = SHARED_CLIENT
        if self.keys_file is not None:
            self._refresh()
            supplied = digest(token)
            for client, value in self._keys.items():
                if hmac.compare_digest(supplied, value):
                    found = client
        return found


class RateLimiter:
    """Images per minute for each client, as token buckets: a client may use a minute's allowance at once,
    then `per_minute / 60` images a second. `limits` overrides `default` (None: unlimited) by client name.
    The app's one `Allowances` replica holds the limiter every Ingress replica takes from."""

    def __init__(self, default: int | None, limits: dict[str, int] | None = None, clock=time.monotonic, *,
                 share: float = 1.0, floor: int = 0) -> None:
        self.default, self.limits, self.clock = default, dict(limits or {}), clock
        # `share` of each allowance (one of N Ingress replicas counting apart: 1/N), never below `floor` images
        self.share, self.floor = share, floor
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()
        self.changes = 0  # counts takes and refunds: a saved state taken before the last one is stale

    def limit(self, client: str) -> int | None:
        """The client's allowance: images per minute (None: unlimited)."""
        return self.limits.get(client, self.default)

    def _capacity(self, client: str) -> float | None:
        """The images this limiter gives the client a minute: its `share` of the allowance, at least `floor`."""
        limit = self.limit(client)
        return None if limit is None else max(float(self.floor), limit * self.share)

    def wait_s(self, client: str, images: float) -> float:
        """0 and the images taken from the client's allowance, or the seconds until they would fit (nothing
        taken). A request larger than a whole minute's allowance never fits: its wait is infinite."""
        limit = self._capacity(client)
        if limit is None:
            return 0.0
        if images > limit:
            return float("inf")
        rate, now = limit / 60.0, self.clock()
        with self._lock:
            tokens = self._tokens(client, limit, now)
            if tokens >= images:
                self._buckets[client] = (tokens - images, now)
                self.changes += 1
                return 0.0
            self._buckets[client] = (tokens, now)
            return (images - tokens) / rate

    def remaining(self, client: str) -> int | None:
        """Whole images the client may ask for now (None: unlimited); takes nothing."""
        limit = self._capacity(client)
        if limit is None:
            return None
        with self._lock:
            return int(self._tokens(client, limit, self.clock()))

    def _tokens(self, client: str, limit: float, now: float) -> float:
        """The client's images in hand at `now` (refilled since its last use, up to a minute's worth)."""
        tokens, when = self._buckets.get(client, (float(limit), now))
        return min(float(limit), tokens + (now - when) * limit / 60.0)

    def refund(self, client: str, images: float) -> None:
        """Give back what `wait_s` took for a request that got no images (refused, failed or abandoned)."""
        limit = self._capacity(client)
        if limit is None:
            return
        with self._lock:
            if client in self._buckets:
                tokens, when = self._buckets[client]
                self._buckets[client] = (min(float(limit), tokens + images), when)
                self.changes += 1

    def export(self) -> dict[str, float]:
        """The images in hand now of each limited client short of a full minute's worth (the others are full)."""
        now, held = self.clock(), {}
        with self._lock:
            for client in self._buckets:
                limit = self._capacity(client)
                if limit is not None and (tokens := self._tokens(client, limit, now)) < limit:
                    held[client] = tokens
        return held

    def restore(self, held: dict[str, float], elapsed_s: float) -> None:
        """Take up `export()`ed buckets (of a whole allowance: this limiter takes its `share` of each), refilled
        for the `elapsed_s` since (a client's limit may have changed meanwhile: capped at the current one; one no
        longer limited is left out)."""
        now = self.clock()
        with self._lock:
            for client, tokens in held.items():
                limit = self._capacity(client)
                if limit is not None:
                    refill = max(0.0, elapsed_s) * limit / 60.0
                    self._buckets[client] = (min(limit, max(0.0, tokens) * self.share + refill), now)


ALLOWANCES_STATE = "_state/allowances-{app}.json"  # in the app's output store


class SavedAllowances:
    """A `RateLimiter`'s buckets kept in a store (the app's outputs), so that the `Allowances` replica Serve
    starts in place of one that died or was redeployed goes on from them, refilled for the time since they
    were saved, instead of giving every client a full minute again. Saved after a change at most every
    `interval_s`: a restart forgets at most that long's takes (and whatever the Ingress replicas counted on
    their own while no Allowances replica answered). A saved state that cannot be read is logged and left
    out (every client full), never an app that does not start."""

    def __init__(self, store: ObjectStore, key: str, clock=time.time) -> None:
        self.store, self.key, self.clock = store, key, clock
        self._saved = 0  # the limiter's change count last saved (or loaded)

    def load(self, limiter: RateLimiter) -> int:
        """Restore the saved buckets into `limiter`; returns how many clients were short of a full minute."""
        try:
            state = json.loads(self.store.read_bytes(self.key))
            saved_at = float(state["saved_at"])
            held = {str(client): float(tokens) for client, tokens in state["tokens"].items()}
        except ObjectNotFoundError:
            return 0
        except (StorageError, ValueError, KeyError, TypeError, AttributeError) as err:
            logger.warning("allowances: the saved state %s/%s cannot be read (%s: %s); every client starts with a "
                           "full minute", self.store.uri, self.key, type(err).__name__, err)
            return 0
        limiter.restore(held, self.clock() - saved_at)
        self._saved = limiter.changes
        return len(held)

    def save(self, limiter: RateLimiter) -> bool:
        """Save the buckets if they changed since the last save; True if written."""
        changes = limiter.changes  # read first: a take meanwhile is saved next time
        if changes == self._saved:
            return False
        state = {"saved_at": self.clock(), "tokens": limiter.export()}
        self.store.write_bytes(self.key, json.dumps(state).encode())
        self._saved = changes
        return True

    def keep(self, limiter: RateLimiter, interval_s: float = 1.0) -> threading.Event:
        """Saves every `interval_s` on a daemon thread until the returned event is set (a failed save is
        logged once until one succeeds, and tried again)."""
        stop = threading.Event()

        def run() -> None:
            failing = False
            while not stop.wait(interval_s):
                try:
                    self.save(limiter)
                    failing = False
                except StorageError as err:
                    if not failing:
                        logger.warning("allowances: cannot save to %s/%s (%s); retrying", self.store.uri, self.key, err)
                    failing = True

        threading.Thread(target=run, name="rdm-allowances-save", daemon=True).start()
        return stop
