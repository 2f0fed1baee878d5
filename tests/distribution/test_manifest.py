"""Publishing a CDN folder and what a device accepts as a manifest: schema, signatures, versions, expiry."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.distribution.keys import keyid
from edge_runtime.distribution.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    canonical_json,
    read_manifest,
)
from edge_runtime.distribution.publish import publish
from edge_runtime.distribution.trust import TrustStore, publisher_id
from edge_runtime.errors import (
    IncompatibleAdapter,
    InvalidGGUF,
    InvalidManifest,
    ManifestExpired,
    PublishRefused,
    RollbackRefused,
    SignatureInvalid,
)
from edge_runtime.files import file_sha256
from edge_runtime.gguf.info import read_info

KeyPair = tuple[Ed25519PrivateKey, Ed25519PublicKey, Path]
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


def _document(cdn: Path) -> bytes:
    return (cdn / "manifest.json").read_bytes()


def test_publish_writes_content_addressed_blobs_and_a_signed_manifest(cdn_dir: Path, adapter_sources: Path,
                                                                      key_pair: KeyPair, base_model: Path) -> None:
    manifest = read_manifest(_document(cdn_dir), source="cdn", public_key=key_pair[1])
    assert manifest.version == 1 and manifest.names == ("brand-voice", "json-extract")
    assert manifest.expires - manifest.created == timedelta(days=30)
    raw = json.loads(_document(cdn_dir))["signed"]["adapters"][1]
    assert set(raw) == {"name", "sha256", "size", "path", "rank", "base_fingerprint", "created", "description"}
    for entry in manifest.adapters:
        source = adapter_sources / f"{entry.name}.gguf"
        blob = cdn_dir / entry.path
        assert blob.read_bytes() == source.read_bytes()
        assert entry.sha256 == file_sha256(blob).hexdigest() and entry.size == source.stat().st_size
        assert entry.path == f"blobs/{entry.sha256}.gguf"
        assert entry.base_fingerprint == read_info(base_model).fingerprint
    assert {e.name: e.rank for e in manifest.adapters} == {"json-extract": 2, "brand-voice": 4}


def test_republishing_bumps_the_version_keeps_created_and_old_blobs(tmp_path: Path, adapter_sources: Path) -> None:
    cdn = tmp_path / "cdn"
    first = publish(adapter_sources, cdn, now=T0).manifest
    source = tmp_path / "src"
    source.mkdir()
    (source / "json-extract.gguf").write_bytes((adapter_sources / "json-extract.gguf").read_bytes())
    second = publish(source, cdn, now=T0 + timedelta(days=1))
    assert second.manifest.version == 2 and second.manifest.names == ("json-extract",) and second.new_blobs == ()
    assert second.manifest.adapters[0].created == first.entry("json-extract").created == T0  # type: ignore[union-attr]
    assert all((cdn / entry.path).is_file() for entry in first.adapters)  # devices mid-download still find them


def test_publish_refuses_a_base_model(tmp_path: Path, base_model: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "base.gguf").symlink_to(base_model)
    with pytest.raises(InvalidGGUF, match="not a LoRA adapter"):
        publish(source, tmp_path / "cdn")
    assert not (tmp_path / "cdn" / "manifest.json").exists()


def test_publish_refuses_an_adapter_without_base_fingerprint(tmp_path: Path, adapter_sources: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_runtime.gguf.info as gguf_info

    monkeypatch.setattr(gguf_info.GGUFInfo, "base_fingerprint", property(lambda self: None))
    with pytest.raises(IncompatibleAdapter, match="no base fingerprint"):
        publish(adapter_sources, tmp_path / "cdn")


def test_readers_never_see_half_a_manifest_while_publishing(tmp_path: Path, adapter_sources: Path,
                                                            key_pair: KeyPair) -> None:
    cdn = tmp_path / "cdn"
    publish(adapter_sources, cdn, key=key_pair[0])
    seen: list[int] = []
    stop = threading.Event()

    def read_forever() -> None:
        while not stop.is_set():
            seen.append(read_manifest(_document(cdn), source="cdn", public_key=key_pair[1]).version)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for _ in range(15):
            publish(adapter_sources, cdn, key=key_pair[0])
    finally:
        stop.set()
        reader.join()
    assert seen == sorted(seen) and seen[-1] <= 16 and len(seen) > 1


def test_signature_by_the_trusted_key_verifies_in_any_formatting(cdn_dir: Path, key_pair: KeyPair) -> None:
    envelope = json.loads(_document(cdn_dir))
    compact = json.dumps(envelope, separators=(",", ":")).encode()  # other whitespace, same canonical content
    assert read_manifest(compact, source="cdn", public_key=key_pair[1]).version == 1
    assert envelope["signatures"][0]["keyid"] == keyid(key_pair[1])


def test_wrong_key_tampering_and_unsigned_manifests_are_refused(cdn_dir: Path, key_pair: KeyPair) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureInvalid, match="no signature by the trusted key"):
        read_manifest(_document(cdn_dir), source="cdn", public_key=other)
    envelope = json.loads(_document(cdn_dir))
    envelope["signed"]["adapters"][0]["size"] += 1
    with pytest.raises(SignatureInvalid, match="does not match the content"):
        read_manifest(json.dumps(envelope).encode(), source="cdn", public_key=key_pair[1])
    envelope["signatures"] = []
    with pytest.raises(SignatureInvalid, match="unsigned"):
        read_manifest(json.dumps(envelope).encode(), source="cdn", public_key=key_pair[1])
    # Without a configured key a signature is not required (the device logs a warning).
    assert read_manifest(json.dumps(envelope).encode(), source="cdn", public_key=None).version == 1


def _signed(signed: dict[str, object], key: Ed25519PrivateKey) -> bytes:
    signature = base64.b64encode(key.sign(canonical_json(signed))).decode()
    return json.dumps({"signed": signed, "signatures": [{"keyid": keyid(key.public_key()), "sig": signature}]}).encode()


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("name", "../x", "not a safe adapter name"),
    ("name", "/etc/passwd", "not a safe adapter name"),
    ("name", "a%2fb", "not a safe adapter name"),
    ("path", "blobs/../../x.gguf", "must be 'blobs/"),
    ("path", "/etc/passwd", "must be 'blobs/"),
    ("sha256", "ABC", "64 lowercase hex"),
    ("size", -5, "integer >= 1"),
    ("size", "12", "integer >= 1"),
    ("created", "yesterday", "ISO 8601"),
])
def test_signed_but_hostile_entries_are_refused_naming_the_field(cdn_dir: Path, key_pair: KeyPair, field: str,
                                                                 value: object, problem: str) -> None:
    signed = json.loads(_document(cdn_dir))["signed"]
    signed["adapters"][0][field] = value
    with pytest.raises(InvalidManifest, match=problem) as caught:
        read_manifest(_signed(signed, key_pair[0]), source="cdn", public_key=key_pair[1])
    assert caught.value.field == f"signed.adapters[0].{field}"


def test_missing_fields_unknown_schema_and_duplicates_are_named(cdn_dir: Path) -> None:
    signed = json.loads(_document(cdn_dir))["signed"]
    del signed["adapters"][1]["sha256"]
    with pytest.raises(InvalidManifest) as caught:
        Manifest.from_dict(signed, source="cdn")
    assert caught.value.field == "signed.adapters[1].sha256" and "missing" in str(caught.value)
    signed = json.loads(_document(cdn_dir))["signed"]
    with pytest.raises(InvalidManifest, match="2 is not supported"):
        Manifest.from_dict(signed | {"schema_version": 2}, source="cdn")
    with pytest.raises(InvalidManifest, match="listed twice: brand-voice"):
        Manifest.from_dict(signed | {"adapters": [signed["adapters"][0]] * 2}, source="cdn")
    assert Manifest.from_dict(signed | {"future_key": 1}, source="cdn").version == 1  # unknown keys: ignored


def test_manifests_over_the_bound_or_not_json_are_refused() -> None:
    with pytest.raises(InvalidManifest, match="more than the"):
        read_manifest(b" " * (MAX_MANIFEST_BYTES + 1), source="cdn", public_key=None)
    with pytest.raises(InvalidManifest, match="not UTF-8 JSON"):
        read_manifest(b"\xff{", source="cdn", public_key=None)


@pytest.mark.parametrize("document", [b'{"signed": {"version": ' + b"9" * 5000 + b"}}",
                                      b"[" * 100_000 + b"]" * 100_000], ids=["5000-digit-integer", "deep-nesting"])
def test_unsigned_bytes_that_break_the_json_parser_are_a_typed_refusal(document: bytes, key_pair: KeyPair) -> None:
    # Regression: both escaped as raw ValueError / RecursionError (a traceback from sync, a 500 from /v1/sync).
    for public_key in (None, key_pair[1]):
        with pytest.raises(InvalidManifest, match="not UTF-8 JSON"):
            read_manifest(document, source="cdn", public_key=public_key)


def _manifest(version: int, *, created: datetime = T0, days: float = 30) -> Manifest:
    return Manifest(version=version, created=created, expires=created + timedelta(days=days), adapters=())


def test_versions_only_grow(tmp_path: Path) -> None:
    trust = TrustStore(tmp_path)
    trust.accept("cdn", _manifest(3), now=T0)
    trust.accept("cdn", _manifest(3), now=T0)  # the same manifest again is fine
    with pytest.raises(RollbackRefused, match="version 2 is older than version 3") as caught:
        trust.accept("cdn", _manifest(2), now=T0)
    assert (caught.value.offered_version, caught.value.trusted_version) == (2, 3)
    with pytest.raises(RollbackRefused, match="changed content without a new version"):
        trust.accept("cdn", _manifest(3, days=60), now=T0)
    assert TrustStore(tmp_path).get("cdn").version == 3  # type: ignore[union-attr]  (persisted)
    trust.accept("another-cdn", _manifest(1), now=T0)  # floors are per CDN


def test_expired_manifests_are_refused_even_when_the_clock_was_reset(tmp_path: Path) -> None:
    trust = TrustStore(tmp_path)
    with pytest.raises(ManifestExpired, match="expired at 2025-03-31T00:00:00Z"):
        trust.accept("cdn", _manifest(1), now=T0 + timedelta(days=31))
    trust.accept("cdn", _manifest(5, created=T0 + timedelta(days=40)), now=T0 + timedelta(days=41))
    stale = _manifest(6, created=T0)  # newer version, but it expired before the manifest already seen was made
    with pytest.raises(ManifestExpired):
        trust.accept("cdn", stale, now=datetime(1970, 1, 1, tzinfo=timezone.utc))  # RTC lost: floor applies
    record = trust.get("cdn")
    assert record is not None and record.clock_floor == T0 + timedelta(days=40)


def test_floors_without_a_pinned_key_follow_the_normalised_address() -> None:
    same = ["http://127.0.0.1:8080/cdn", "HTTP://127.0.0.1:8080/cdn/", "http://127.0.0.1:8080/cdn/.",
            "http://127.0.0.1:8080/x/../cdn"]
    assert {publisher_id(url, None) for url in same} == {"url:http://127.0.0.1:8080/cdn"}
    assert publisher_id("https://cdn.example:443/a", None) == publisher_id("https://CDN.example/a", None)
    assert publisher_id("http://cdn.example/a", None) != publisher_id("http://cdn.example/b", None)


def test_a_timestamp_past_what_utc_can_hold_is_an_invalid_manifest(cdn_dir: Path) -> None:
    signed = json.loads(_document(cdn_dir))["signed"]
    with pytest.raises(InvalidManifest, match="is not an ISO 8601 UTC time"):  # was an OverflowError traceback
        Manifest.from_dict(signed | {"expires": "9999-12-31T23:59:59-01:00"}, source="cdn")


_PUBLISH_LOOP = """
import sys, time
from pathlib import Path
from edge_runtime.distribution.publish import publish
source, cdn, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
for _ in range(6):
    result = publish(source, cdn)
    print(result.manifest.version, result.manifest.digest, flush=True)
"""


def test_concurrent_publishes_into_one_folder_never_write_one_version_twice(tmp_path: Path,
                                                                           adapter_sources: Path) -> None:
    # Issue 18 item 6: two publishes read the same floor and both wrote version n+1 with different content (7/10).
    sources = []
    for name in ("json-extract", "brand-voice"):
        folder = tmp_path / f"src-{name}"
        folder.mkdir()
        shutil.copyfile(adapter_sources / f"{name}.gguf", folder / f"{name}.gguf")
        sources.append(folder)
    cdn, go = tmp_path / "cdn", tmp_path / "go"
    publish(sources[0], cdn)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen([sys.executable, "-c", _PUBLISH_LOOP, str(source), str(cdn), str(go)], env=env,
                             stdout=subprocess.PIPE, text=True) for source in sources]
    time.sleep(0.5)  # both are waiting for the go file (a head start only; the assertions do not depend on it)
    go.touch()
    lines = [line.split() for run in runs for line in run.communicate(timeout=300)[0].splitlines()]
    assert [run.returncode for run in runs] == [0, 0]
    versions = sorted(int(version) for version, _ in lines)
    assert versions == list(range(2, 14)), lines  # twelve publishes after the first: each its own version
    assert read_manifest(_document(cdn), source="cdn", public_key=None).version == 13


def test_publishing_unsigned_over_a_signed_manifest_needs_unsigned(cdn_dir: Path, adapter_sources: Path) -> None:
    # Issue 18 item 6: it exited 0 with a warning, and every device pinned to the key then refused all updates.
    before = _document(cdn_dir)
    with pytest.raises(PublishRefused, match="manifest is signed") as refused:
        publish(adapter_sources, cdn_dir)
    assert refused.value.exit_code == 2 and "--unsigned" in str(refused.value)
    assert _document(cdn_dir) == before
    result = publish(adapter_sources, cdn_dir, unsigned=True)
    assert not result.signed and result.manifest.version == 2 and result.key_changed


def test_a_file_whose_adapter_name_inside_differs_is_published_only_when_renamed_explicitly(
        tmp_path: Path, adapter_sources: Path) -> None:
    # Issue 18 item 5: devices named a blob after the name inside it; a renamed file must be a deliberate choice.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(adapter_sources / "json-extract.gguf", source / "legal.gguf")
    with pytest.raises(PublishRefused, match="named 'json-extract', its file 'legal'"):
        publish(source, tmp_path / "cdn")
    assert not (tmp_path / "cdn" / "manifest.json").exists()
    assert publish(source, tmp_path / "cdn", allow_renamed=True).manifest.names == ("legal",)


def test_one_forged_unsigned_manifest_cannot_lock_an_address_out_for_good(tmp_path: Path) -> None:
    # Issue 18 item 7: without a key, version 2^62 created in 9999 raised the floors past anything real.
    trust, unsigned = TrustStore(tmp_path), "url:http://127.0.0.1:9/cdn"
    trust.accept(unsigned, _manifest(3), now=T0)
    forged = _manifest(2**62, created=datetime(9998, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(RollbackRefused, match="jumps more than 10000 past version 3") as jump:
        trust.accept(unsigned, forged, now=T0)
    assert "--reset-trust" in str(jump.value)
    with pytest.raises(RollbackRefused, match="more than 400 days after"):
        trust.accept(unsigned, _manifest(4, created=datetime(9998, 1, 1, tzinfo=timezone.utc)), now=T0)
    assert trust.get(unsigned).version == 3  # type: ignore[union-attr]
    trust.accept(unsigned, _manifest(4, created=T0 + timedelta(days=1)), now=T0)  # the real next one

    # A first manifest has no floor to step from: a forged one is taken, and the operator resets it.
    fresh = TrustStore(tmp_path / "fresh")
    fresh.accept(unsigned, forged, now=T0)
    with pytest.raises(RollbackRefused, match="older than version") as locked:
        fresh.accept(unsigned, _manifest(5), now=T0)
    assert "edge-rt sync --cdn URL --reset-trust" in str(locked.value)
    assert fresh.reset(unsigned) and fresh.get(unsigned) is None
    fresh.accept(unsigned, _manifest(5), now=T0)
    with pytest.raises(ValueError, match="cannot be reset"):
        fresh.reset("key:abc")


def test_keyed_floors_take_any_step_a_signature_vouches_for(tmp_path: Path) -> None:
    trust = TrustStore(tmp_path)
    trust.accept("key:abc", _manifest(3), now=T0)
    trust.accept("key:abc", _manifest(2**40, created=T0 + timedelta(days=1000)), now=T0)
    assert trust.get("key:abc").version == 2**40  # type: ignore[union-attr]
