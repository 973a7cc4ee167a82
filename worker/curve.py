"""Loading a client's or worker's CurveZMQ keys (the layout is documented in ``pool.keys``).

It lives in ``worker/`` because workers load keys too, and ``worker/`` never imports ``pool/``.
"""

from __future__ import annotations

import os
import stat
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
            f"{what} not found at {path}. Create keys with `runnable-k8s keys DIR`, then give a client "
            "DIR/clients/NAME and a worker DIR/worker."
        )
    return path


def secret_file_problem(mode: int, owner: int, euid: int) -> str | None:
    """Why a secret key file with these permission bits and owner must not be used, or None.

    The file must be readable by nobody but us: owned by this user with no group or other bits
    (0600 or less). One exception, PostgreSQL's rule for its TLS key: a file owned by root may
    also be readable (never writable) by its group, 0640 or less, which is how Kubernetes mounts
    a Secret for a non-root container (root-owned, group = the Pod's fsGroup, mode 0440).
    """
    if owner == euid:
        if mode & 0o077:
            return f"it is {stat.filemode(mode)[1:]} ({mode & 0o777:04o}): others on this machine may read or change it"
        return None
    if owner == 0:
        if mode & 0o037:
            return (f"it is owned by root and {stat.filemode(mode)[1:]} ({mode & 0o777:04o}): only the "
                    "owner may write it and no one outside its group may read it")
        return None
    return f"it is owned by another user (uid {owner}), who can read it; keep your own copy"


def check_secret_file(path: Path) -> Path:
    """Refuse a secret key file that other users could read or change (see ``secret_file_problem``)."""
    info = path.stat()
    problem = secret_file_problem(info.st_mode, info.st_uid, os.geteuid())
    if problem is not None:
        raise PermissionError(
            f"refusing to use the secret key {path}: {problem}. Anyone who reads it can pose as this "
            f"peer. Run `chmod 600 {path}` and `chmod 700 {path.parent}` (as the user that runs "
            "this program), or make new keys with `runnable-k8s keys DIR`."
        )
    return path


def changeable_problem(mode: int, owner: int, euid: int, read_only: bool) -> str | None:
    """Why a key folder, an allow-list or a public key file with these permission bits and owner
    must not be trusted, or None. Whoever can change it can swap the keys in it: put their own key
    on an allow-list, or the key of a broker of theirs where a client or worker looks for the
    broker's (and talk to it in its place).

    It must belong to this user or to root (as secret key files may) and be writable by nobody
    else (no group or other write bit). A file system mounted read-only cannot be changed by
    anyone, whatever the bits say: that is how Kubernetes mounts a Secret (its folder is root's
    and mode 1777 on a read-only mount, its files root's behind ``..data`` symlinks).
    """
    if read_only:
        return None
    if owner not in (euid, 0):
        return f"it is owned by another user (uid {owner}), who can change it"
    if mode & 0o022:
        return f"it is {stat.filemode(mode)[1:]} ({mode & 0o7777:04o}): its group or others may change it"
    return None


def _on_read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no name (a container's runAsUser)
        return str(os.geteuid())


def check_not_changeable(path: Path, what: str) -> Path:
    """Refuse ``path`` (``what``: "the key folder", "the allow-list", ...) when another user could
    change it (see ``changeable_problem``); a symlink is judged by what it points to, and so is
    the folder that holds that target (a Kubernetes Secret's ``..data``)."""
    targets = [path]
    real = Path(os.path.realpath(path))
    if real != path.absolute():
        targets.append(real)
    if not path.is_dir() and real.parent != path.absolute().parent:
        targets.append(real.parent)
    for target in targets:
        info = target.stat()
        problem = changeable_problem(info.st_mode, info.st_uid, os.geteuid(), _on_read_only_mount(target))
        if problem is not None:
            fix = f"`chown {_user_name()} {target}` (as root)" if "owned by" in problem else f"`chmod go-w {target}`"
            via = f" (where {path} leads)" if target != path else ""
            raise PermissionError(
                f"refusing to use {what} {target}{via}: {problem}, and whoever can change it can swap the keys "
                f"(allow themselves in, or pose as the broker). Run {fix}, or make new keys with "
                "`runnable-k8s keys DIR`."
            )
    return path


def load_peer_keys(directory: str | Path, role: str) -> PeerKeys:
    """Load ``role``'s pair ("client" or "worker") and the broker's public key from ``directory``:
    ``DIR/clients/NAME`` for a client, ``DIR/worker`` for a worker (``runnable-k8s keys DIR``).
    The folder and the broker's public key must be unchangeable by others, the secret private."""
    directory = Path(directory)
    _refuse_wrong_folder(directory, role)
    check_not_changeable(require(directory, f"the {role} key folder"), f"the {role} key folder")
    secret_file = check_secret_file(require(directory / f"{role}.key_secret", f"the {role} secret key"))
    check_not_changeable(secret_file, f"the {role} secret key")
    public, secret = zmq.auth.load_certificate(secret_file)
    broker_file = require(directory / "broker.key", "the broker public key")
    server_public, _ = zmq.auth.load_certificate(check_not_changeable(broker_file, "the broker public key"))
    if secret is None:
        raise ValueError(f"{directory / f'{role}.key_secret'} holds no secret key")
    return PeerKeys(public=public, secret=secret, server_public=server_public)


def _folder_hint(top: Path, role: str) -> str:
    if role == "worker":
        return f"pass {top / 'worker'} to a worker"
    clients = sorted(p.name for p in (top / "clients").iterdir() if p.is_dir()) if (top / "clients").is_dir() else []
    names = f" (clients here: {', '.join(clients)})" if clients else ""
    return f"pass {top / 'clients'}/NAME to a client{names}"


def _refuse_wrong_folder(directory: Path, role: str) -> None:
    """A clear error for a folder of a key tree that is not ``role``'s own (the top of the tree,
    the broker's folder, the folder of all clients): those hold other roles' secrets, or none."""
    if (directory / f"{role}.key_secret").exists():
        return
    if (directory / "broker").is_dir() and (directory / "broker" / "broker.key_secret").exists():
        raise FileNotFoundError(
            f"{directory} is the top of a key tree from `runnable-k8s keys`, which holds every role's "
            f"folder: give each program only its own ({_folder_hint(directory, role)}; the broker takes "
            f"{directory / 'broker'})."
        )
    if (directory / "broker.key_secret").exists():
        raise FileNotFoundError(
            f"{directory} is the broker's key folder, not a {role}'s: "
            f"{_folder_hint(directory.parent, role)}."
        )
    other = {"client": "worker", "worker": "client"}.get(role)
    if other and (directory / f"{other}.key_secret").exists():
        top = directory.parent if other == "worker" else directory.parent.parent
        raise FileNotFoundError(f"{directory} is a {other}'s key folder, not a {role}'s: {_folder_hint(top, role)}.")
    if role == "client" and any((p / "client.key_secret").exists() for p in directory.glob("*/")):
        names = sorted(p.name for p in directory.iterdir() if (p / "client.key_secret").exists())
        raise FileNotFoundError(
            f"{directory} holds the folders of several clients ({', '.join(names)}): pass one of them, "
            f"e.g. {directory / names[0]}."
        )
