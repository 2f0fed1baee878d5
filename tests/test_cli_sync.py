"""`edge-rt keygen`, `edge-rt publish` and `edge-rt sync` as an operator and a device run them."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli import main
from edge_runtime.errors import SignatureInvalid


@pytest.fixture
def published(tmp_path: Path, adapter_sources: Path) -> tuple[Path, Path]:
    """A CDN folder published with a fresh key; returns (cdn folder, public key)."""
    runner = CliRunner()
    key = tmp_path / "keys" / "cdn.key"
    made = runner.invoke(main, ["keygen", "--out", str(key)])
    assert made.exit_code == 0, made.output
    done = runner.invoke(main, ["publish", str(adapter_sources), "--out", str(tmp_path / "cdn"), "--key", str(key),
                                "--expires-days", "7"])
    assert done.exit_code == 0, done.output
    assert "version 1, 2 adapters, 2 new blobs" in done.output and "signed" in done.output
    return tmp_path / "cdn", key.with_name("cdn.key.pub")


def test_keygen_writes_a_private_key_only_the_owner_reads_and_refuses_to_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "k"
    assert CliRunner().invoke(main, ["keygen", "--out", str(key)]).exit_code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"PUBLIC KEY" in key.with_name("k.pub").read_bytes()
    again = CliRunner().invoke(main, ["keygen", "--out", str(key)])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


def test_published_files_are_readable_by_an_origin_running_as_another_user(
        published: tuple[Path, Path], adapter_sources: Path, tmp_path: Path) -> None:
    cdn, public_key = published
    files = [cdn / "manifest.json", public_key, *(cdn / "blobs").iterdir()]
    assert len(files) == 4 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}  # were 0600
    import os

    old = os.umask(0o077)  # a publisher with a strict umask: folders were 0700, so nginx still answered 403
    try:
        done = CliRunner().invoke(main, ["publish", str(adapter_sources), "--out", str(tmp_path / "strict")])
        assert done.exit_code == 0
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "strict", tmp_path / "strict" / "blobs")} == {0o755}


def test_publishing_an_empty_folder_is_refused_unless_asked(tmp_path: Path, published: tuple[Path, Path]) -> None:
    cdn, _ = published
    before = (cdn / "manifest.json").read_bytes()
    (tmp_path / "empty").mkdir()
    refused = CliRunner().invoke(main, ["publish", str(tmp_path / "empty"), "--out", str(cdn)])
    assert refused.exit_code == 2 and "would withdraw all 2 adapters" in refused.output and "--allow-empty" in \
        refused.output
    assert (cdn / "manifest.json").read_bytes() == before
    done = CliRunner().invoke(main, ["publish", str(tmp_path / "empty"), "--out", str(cdn), "--allow-empty",
                                     "--unsigned"])
    assert done.exit_code == 0 and "version 2, 0 adapters" in done.output


def test_publishing_with_another_key_than_the_last_manifest_warns(tmp_path: Path, published: tuple[Path, Path],
                                                                  adapter_sources: Path) -> None:
    cdn, public_key = published
    other = tmp_path / "other.key"
    assert CliRunner().invoke(main, ["keygen", "--out", str(other)]).exit_code == 0
    same = CliRunner().invoke(main, ["publish", str(adapter_sources), "--out", str(cdn), "--key",
                                     str(public_key.with_suffix(""))])
    assert same.exit_code == 0 and "warning" not in same.output
    changed = CliRunner().invoke(main, ["publish", str(adapter_sources), "--out", str(cdn), "--key", str(other)])
    assert changed.exit_code == 0 and "warning: the previous manifest was signed by" in changed.output
    assert "devices pinned to the old key refuse it" in changed.output
    # Issue 18 item 6: without --key over a signed manifest it exited 0, and every pinned device then refused updates.
    refused = CliRunner().invoke(main, ["publish", str(adapter_sources), "--out", str(cdn)])
    assert refused.exit_code == 2 and "its manifest is signed" in refused.output and "--unsigned" in refused.output
    unsigned = CliRunner().invoke(main, ["publish", str(adapter_sources), "--out", str(cdn), "--unsigned"])
    assert unsigned.exit_code == 0 and "this one by no key (UNSIGNED)" in unsigned.output


def test_sync_fetches_adapters_into_the_cache_with_progress(tmp_path: Path, published: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cdn, public_key = published
    monkeypatch.delenv("HF_HUB_OFFLINE")
    result = CliRunner().invoke(main, ["sync", "--cdn", cdn.as_uri(), "--all", "--public-key", str(public_key),
                                       "--cache-mb", "10"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(" downloaded " in line for line in lines)
    assert "MB/s" in result.stderr and "ETA" in result.stderr
    assert "2 adapters ready (manifest version 1)" in result.stderr
    cached = sorted((tmp_path / "edge-rt-home" / "adapters" / "refs").iterdir())
    assert [p.name for p in cached] == ["brand-voice", "json-extract"]

    again = CliRunner().invoke(main, ["sync", "--cdn", cdn.as_uri(), "--adapters", "json-extract", "--public-key",
                                      str(public_key)])
    assert again.exit_code == 0 and " cached " in again.stdout


def test_sync_offline_lists_the_cache_and_names_a_miss(tmp_path: Path, published: tuple[Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cdn, public_key = published
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert CliRunner().invoke(main, ["sync", "--cdn", cdn.as_uri(), "--adapters", "json-extract"]).exit_code == 0
    offline = CliRunner().invoke(main, ["sync", "--cdn", "http://127.0.0.1:9", "--all", "--offline"])
    assert offline.exit_code == 0, offline.output
    assert "json-extract  cached" in offline.stdout and "(offline)" in offline.stderr
    miss = CliRunner().invoke(main, ["sync", "--cdn", "http://127.0.0.1:9", "--adapters", "brand-voice", "--offline"])
    assert miss.exit_code == 3 and "not cached and the device is offline" in miss.stderr


def test_sync_with_the_wrong_key_exits_with_the_untrusted_data_code(tmp_path: Path, published: tuple[Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cdn, _ = published
    monkeypatch.delenv("HF_HUB_OFFLINE")
    other = tmp_path / "other.key"
    CliRunner().invoke(main, ["keygen", "--out", str(other)])
    result = CliRunner().invoke(main, ["sync", "--cdn", cdn.as_uri(), "--all", "--public-key",
                                       f"{other}.pub"])
    assert result.exit_code == SignatureInvalid.exit_code == 9
    assert "no signature by the trusted key" in result.stderr
    assert not (tmp_path / "edge-rt-home" / "adapters" / "blobs").exists() or not any(
        (tmp_path / "edge-rt-home" / "adapters" / "blobs").iterdir())


def test_reset_trust_with_a_pinned_key_says_it_only_applies_to_unsigned_cdns(
        published: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # From a new user's walk: the refusal told them to fix "the profile's [compute] table".
    cdn, public_key = published
    monkeypatch.delenv("HF_HUB_OFFLINE")
    result = CliRunner().invoke(main, ["sync", "--cdn", cdn.as_uri(), "--all", "--public-key", str(public_key),
                                       "--reset-trust"])
    assert result.exit_code == 2
    assert "it only resets the floors of unsigned CDNs" in result.stderr and "Drop --reset-trust" in result.stderr
    assert "[compute]" not in result.stderr


def test_sync_needs_exactly_one_of_adapters_and_all(published: tuple[Path, Path]) -> None:
    cdn, _ = published
    for args in ([], ["--all", "--adapters", "a"]):
        result = CliRunner().invoke(main, ["sync", "--cdn", cdn.as_uri(), *args])
        assert result.exit_code == 2 and "exactly one of --adapters" in result.output


def test_publish_twice_grows_the_version(tmp_path: Path, adapter_sources: Path) -> None:
    for version in (1, 2):
        result = CliRunner().invoke(main, ["publish", str(adapter_sources), "--out", str(tmp_path / "cdn")])
        assert result.exit_code == 0 and f"version {version}," in result.output and "UNSIGNED" in result.output
    assert json.loads((tmp_path / "cdn" / "manifest.json").read_text())["signed"]["version"] == 2


def test_ctrl_c_in_sync_exits_130_and_says_the_download_resumes(tmp_path: Path, large_adapter: Path) -> None:
    # Issue 18 item 20: Ctrl-C in `sync` ended in a traceback, not 130 with a word on the partial download.
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from edge_runtime.distribution.publish import publish

    publish(large_adapter, tmp_path / "cdn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(tmp_path / "cdn")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "cache"
    env = os.environ | {"HF_HUB_OFFLINE": "0", "EDGE_RT_HOME": str(tmp_path / "home")}
    try:
        while subprocess.run(["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}))"],
                             capture_output=True).returncode:
            time.sleep(0.05)
        sync = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", f"http://127.0.0.1:{port}",
                                 "--all", "--cache-dir", str(cache), "--max-kbps", "40"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not any(p.stat().st_size for p in (cache / "partial").glob("*.part")):  # (no folder yet: no match)
            assert sync.poll() is None, sync.communicate()
            time.sleep(0.05)
        sync.send_signal(signal.SIGINT)
        _, stderr = sync.communicate(timeout=120)
    finally:
        server.terminate()
        server.wait()
    assert sync.returncode == 130, stderr
    assert "next `edge-rt sync` resumes" in stderr and "Traceback" not in stderr
    assert any(p.stat().st_size for p in (cache / "partial").glob("*.part"))
