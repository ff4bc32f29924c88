"""Feedback tokens: only whoever received a ``/rank`` answer can label it.

``/feedback`` writes training labels. Without a credential anyone who can
reach the service could write them for any request id they see or guess.
Each answer therefore carries ``feedback_token``, an HMAC-SHA256 of its
request id under a server secret, and ``/feedback`` requires it: the token
proves the caller saw that answer, without the service keeping per-client
state or a session.

The secret is ``MTLREC_FEEDBACK_SECRET``. When it is unset, one is generated
once and kept beside the production pointer (``$BENTOML_HOME/mtlrec/
feedback.secret``, mode 0600), which every replica of a deployment reads
since they share the model store; a token signed by one replica is accepted
by all. Changing the secret invalidates the tokens of answers given before.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("mtlrec.service")

SECRET_FILE = "feedback.secret"


def _shared_secret(directory: Path) -> bytes:
    """The secret in ``directory``, created (atomically, once, whoever comes first) if it is not there."""
    path = directory / SECRET_FILE
    if not path.is_file():
        tmp = directory / f".{SECRET_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another replica made it first: theirs stands
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    value = path.read_text().strip()
    if len(value) < 32:
        raise ValueError(f"{path} holds no usable secret (under 32 characters): delete it to have one generated, "
                         "or set MTLREC_FEEDBACK_SECRET")
    return value.encode()


class Tokens:
    """Signs and checks feedback tokens under one secret."""

    def __init__(self, secret: bytes):
        if not secret:
            raise ValueError("a feedback secret must not be empty")
        self._key = hashlib.sha256(secret).digest()

    @classmethod
    def from_settings(cls, configured: str) -> "Tokens":
        """``configured`` (``MTLREC_FEEDBACK_SECRET``), else the deployment's shared generated secret."""
        if configured:
            return cls(configured.encode())
        from services.registry_io import registry_dir

        return cls(_shared_secret(registry_dir()))

    @classmethod
    def for_worker(cls, configured: str) -> "Tokens":
        """``from_settings``, or a secret of this worker's own when the shared one cannot be read: logged, not
        raised, because a service worker whose constructor raises is restarted forever (``mtlrec serve`` checks
        the secret before it starts any)."""
        try:
            return cls.from_settings(configured)
        except (OSError, ValueError) as e:
            log.error("no shared feedback secret (%s): this worker signs with its own, which no other replica "
                      "accepts; set MTLREC_FEEDBACK_SECRET", e)
            return cls(os.urandom(32))

    def sign(self, request_id: str) -> str:
        return hmac.new(self._key, request_id.encode(), hashlib.sha256).hexdigest()[:32]

    def valid(self, request_id: str, token: str) -> bool:
        return hmac.compare_digest(self.sign(request_id).encode(), token.encode())
