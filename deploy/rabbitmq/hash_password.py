"""Print the RabbitMQ ``password_hash`` of a password, for deploy/rabbitmq/definitions.json.

RabbitMQ 3.10 has no ``rabbitmqctl hash_password``; its default scheme is simple: four random
bytes of salt, then SHA-256 of salt + password, base64-encoded together. Stdlib only, so it
runs anywhere (no Arbiter install needed):

    python3 deploy/rabbitmq/hash_password.py            # asks for the password
    python3 deploy/rabbitmq/hash_password.py --verify HASH
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import sys

ALGORITHM = "rabbit_password_hashing_sha256"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``password_hash`` RabbitMQ's sha256 scheme stores for ``password``."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def verify(password: str, password_hash: str) -> bool:
    """Whether ``password_hash`` (sha256 scheme) was made from ``password``."""
    raw = base64.b64decode(password_hash)
    return hmac.compare_digest(hash_password(password, raw[:4]), password_hash)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", metavar="HASH", help="check a password against HASH instead")
    args = parser.parse_args(argv)
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\n")
    if args.verify is not None:
        ok = verify(password, args.verify)
        print("matches" if ok else "does not match")
        return 0 if ok else 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
