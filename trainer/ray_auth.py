"""Ray token authentication for cairl runs: a private token per local cluster, a token required to join one.

Ray 2.60 authenticates every connection with a token, but the token file it generates on first use
(~/.ray/auth_token) is created readable by every local user, and a driver joining an existing cluster
runs without auth when the environment turns it off. So:

    private_token()                      # local cluster: fresh token, 0600 in a 0700 directory, removed at exit
    require_join_token("10.0.0.5:6379")  # joining: token auth on and a token present, else a UserError

Ray reads RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from the environment, and the processes it starts
(GCS, raylet, workers) inherit both.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from models.errors import UserError

DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"


class RayAuthError(UserError, RuntimeError):
    """Token authentication is off or no token is available for a cluster cairl would join."""


def private_token() -> Path | None:
    """Point Ray at a fresh random token readable by this user only, removed when this process exits (after
    ray.shutdown); returns its directory, or None when the user named a token already (RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH)."""
    _require_token_mode("a local cluster")
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    directory = Path(tempfile.mkdtemp(prefix="cairl-ray-token-"))  # mode 0700
    path = directory / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    atexit.register(shutil.rmtree, directory, True)
    return directory


def require_join_token(address: str) -> None:
    """Joining `address` needs token auth on and the cluster's token here; a loose default token file is
    made owner-only."""
    _require_token_mode(f"joining ray.address={address}")
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN"):
        pass
    elif named:
        if not Path(named).is_file():
            raise RayAuthError(f"RAY_AUTH_TOKEN_PATH={named} is not a file; expected the token of the cluster at "
                               f"{address}")
    elif DEFAULT_TOKEN.is_file():
        if DEFAULT_TOKEN.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            os.chmod(DEFAULT_TOKEN, 0o600)  # Ray creates it readable by all users
    else:
        raise RayAuthError(
            f"joining ray.address={address} needs the cluster's auth token and none is set: copy it from the head "
            f"node (~/.ray/auth_token there) and set RAY_AUTH_TOKEN_PATH to the copy (readable by you only)")
    os.environ["RAY_AUTH_MODE"] = "token"


def _require_token_mode(what: str) -> None:
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise RayAuthError(f"RAY_AUTH_MODE={mode}: cairl runs Ray with token authentication only ({what}); unset "
                           f"RAY_AUTH_MODE or set it to 'token'")
