"""ed25519 keys that sign CDN manifests: generate, load, name (key id), sign and verify bytes.

A key id is the sha256 of the raw 32-byte public key. Signatures travel as ``{"keyid": ..., "sig": base64}``
entries beside the signed content (see ``manifest.py`` for the envelope they sit in).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import SignatureInvalid
from edge_runtime.files import atomic_output, read_bounded

MAX_KEY_BYTES = 64 * 1024

__all__ = ["generate_key", "keyid", "load_private_key", "load_public_key", "sign", "verify"]


def sign(key: Ed25519PrivateKey, payload: bytes) -> dict[str, str]:
    """A signature entry for ``payload``: ``{"keyid": ..., "sig": base64}``."""
    return {"keyid": keyid(key.public_key()), "sig": base64.b64encode(key.sign(payload)).decode("ascii")}


def verify(signatures: object, payload: bytes, public_key: Ed25519PublicKey, *, source: str) -> None:
    """Require one entry of ``signatures`` by ``public_key`` that matches ``payload``; else ``SignatureInvalid``."""
    trusted = keyid(public_key)
    if not isinstance(signatures, list) or not signatures:
        raise SignatureInvalid(source, "the manifest is unsigned", keyid=trusted)
    mine = [s for s in signatures if isinstance(s, dict) and s.get("keyid") == trusted]
    if not mine:
        raise SignatureInvalid(source, "no signature by the trusted key", keyid=trusted)
    for entry in mine:
        try:
            public_key.verify(base64.b64decode(str(entry.get("sig", "")), validate=True), payload)
            return
        except (InvalidSignature, binascii.Error, ValueError):
            continue
    raise SignatureInvalid(source, "the signature does not match the content", keyid=trusted)


def keyid(public_key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: how a signature names its key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key(out: Path) -> tuple[Path, Path]:
    """Write a new ed25519 key pair: ``out`` (PKCS#8 PEM, mode 0600) and ``out.pub`` (PEM); return both paths."""
    private = Ed25519PrivateKey.generate()
    public_path = out.with_name(out.name + ".pub")
    with atomic_output(out) as temp:
        os.chmod(temp, 0o600)
        temp.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with atomic_output(public_path, mode=0o644) as temp:
        temp.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return out, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an ed25519 private key written by ``generate_key``."""
    key = _load_key(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise _not_a_key(path, "private")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key (the ``.pub`` file ``generate_key`` writes)."""
    key = _load_key(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise _not_a_key(path, "public")
    return key


def _load_key(path: Path, loader: Any, **kwargs: Any) -> object:
    try:
        return loader(read_bounded(path, MAX_KEY_BYTES), **kwargs)
    except FileNotFoundError as exc:
        raise _not_a_key(path, "key", "no such file") from exc
    except (ValueError, TypeError) as exc:
        raise _not_a_key(path, "key", str(exc)) from exc


def _not_a_key(path: Path, kind: str, problem: str = "not an ed25519 PEM key") -> SignatureInvalid:
    return SignatureInvalid(str(path), f"cannot use it as the {kind}: {problem}", keyid="-")
