"""CURVE keys for tcp links: ``edge-inspect keys`` makes key pairs; the runtime loads them.

A key pair is two files in ZeroMQ's certificate format: ``<name>.key`` (the public key, to
hand out) and ``<name>.key_secret`` (public + secret, readable by its owner only). The
runtime's profile names its server secret key file and a folder of client public keys
(``*.key``); a tcp endpoint the runtime binds then accepts only those clients::

    edge-inspect keys --out keys --name server           # the runtime's pair
    edge-inspect keys --out keys/clients --name line7    # one per remote camera / viewer

A remote sender connects with its own ``.key_secret`` and the server's ``.key``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth


@dataclass
class CurveKeys:
    """What the runtime's binding sockets need: its key pair and the accepted client keys."""

    server_public: bytes
    server_secret: bytes
    clients: list[bytes] = field(default_factory=list)


def load_keypair(path: str | Path, what: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; a one-line error naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; make a pair with `edge-inspect keys --out "
                                f"{path.parent} --name {path.name.split('.')[0]}`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {path} is not a ZeroMQ key file ({exc})") from None
    if secret is None:
        raise ValueError(f"{what} {path} holds only a public key; name the .key_secret file")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as exc:
        raise ValueError(f"public key file {path} is not a ZeroMQ key file ({exc})") from None


def load_client_keys(folder: str | Path) -> list[bytes]:
    """Every ``*.key`` public key in ``folder`` (none is an error: nobody could connect)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"client key folder {folder} not found; put the public keys (*.key) "
                                "of the allowed senders and viewers there")
    keys = [load_public_key(p) for p in sorted(folder.glob("*.key"))]
    if not keys:
        raise ValueError(f"client key folder {folder} holds no *.key files; nobody could connect")
    return keys


def load_server_keys(server_key: str | Path, client_keys: str | Path) -> CurveKeys:
    public, secret = load_keypair(server_key, "server secret key file")
    return CurveKeys(public, secret, load_client_keys(client_keys))


def make_keypair(out: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<out>/<name>.key`` and ``<name>.key_secret`` (0600); never overwrite."""
    out = Path(out)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ValueError(f"{path} exists; keys are never overwritten: choose another --name or "
                             "remove the old pair first")
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE; install pyzmq's wheel (it has it)")
    out.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(out, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("keys"), help="folder for the key files")
    parser.add_argument("--name", required=True, help="whose pair: server, or a camera / viewer name")


def run(args: argparse.Namespace) -> int:
    public, secret = make_keypair(args.out, args.name)
    print(f"wrote {public} (public: hand it out) and {secret} (secret: keep it, mode 0600)")
    if args.name == "server":
        print(f"profile: security: {{server_key: {secret}, client_keys: <folder of client .key files>}}")
    else:
        print(f"copy {public} into the runtime's security.client_keys folder; the sender uses {secret} "
              "and the server's .key")
    return 0
