"""Loading a client's or worker's CurveZMQ keys (the layout is documented in ``pool.keys``).

It lives in ``worker/`` because workers load keys too, and ``worker/`` never imports ``pool/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class PeerKeys:
    """What a client or worker needs to talk CurveZMQ to the broker."""

    public: bytes
    secret: bytes
    server_public: bytes

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. Create a key directory with `runnable-k8s keys DIR`."
        )
    return path


def load_peer_keys(directory: str | Path, role: str) -> PeerKeys:
    """Load ``role``'s pair ("client" or "worker") and the broker's public key."""
    directory = Path(directory)
    public, secret = zmq.auth.load_certificate(require(directory / f"{role}.key_secret", f"the {role} secret key"))
    server_public, _ = zmq.auth.load_certificate(require(directory / "broker.key", "the broker public key"))
    if secret is None:
        raise ValueError(f"{directory / f'{role}.key_secret'} holds no secret key")
    return PeerKeys(public=public, secret=secret, server_public=server_public)
