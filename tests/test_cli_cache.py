"""`edge-rt cache ls|rm|gc`: the operator's view of the device's adapter cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from peft_dirs import lora_tensors, write_peft_dir

from converters import convert_peft_to_gguf
from edge_runtime.cli import main
from edge_runtime.distribution.store import AdapterStore
from edge_runtime.files import file_sha256


def synced_cache(tmp_path: Path, cdn_dir: Path, public_key: Path) -> Path:
    cache = tmp_path / "cache"
    done = CliRunner().invoke(main, ["sync", "--cdn", cdn_dir.as_uri(), "--all", "--cache-dir", str(cache),
                                     "--public-key", str(public_key)])
    assert done.exit_code == 0, done.output
    return cache


def test_ls_rm_and_gc_show_and_tidy_the_cache_and_keep_what_a_daemon_uses(tmp_path: Path, cdn_dir: Path,
                                                                          key_pair: tuple[object, object, Path],
                                                                          base_model: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")  # file:// CDNs count as network: offline syncs fetch nothing
    cache = synced_cache(tmp_path, cdn_dir, key_pair[2].with_name(key_pair[2].name + ".pub"))
    listing = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "ls", "--json"])
    rows = {row["name"]: row for row in json.loads(listing.output)}
    assert sorted(rows) == ["brand-voice", "json-extract"] and not any(r["in_use"] for r in rows.values())
    store = AdapterStore(cache)
    assert all(store.blob_path(r["sha256"]).stat().st_size == r["size_bytes"] for r in rows.values())
    assert len({r["base_fingerprint"] for r in rows.values()}) == 1

    daemon_like = AdapterStore(cache)  # a live process serving json-extract holds a lease on its blob
    assert daemon_like.lease(rows["json-extract"]["sha256"])
    text = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "ls"]).output
    assert "json-extract" in text and "in use by a daemon" in text.split("json-extract")[1].splitlines()[0]
    refused = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "rm", "json-extract"])
    assert refused.exit_code == 1 and "in use by a running daemon" in refused.output
    removed = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "rm", "brand-voice"])
    assert removed.exit_code == 0 and store.lookup("brand-voice") is None
    assert not store.blob_path(rows["brand-voice"]["sha256"]).exists()
    missing = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "rm", "nope"])
    assert missing.exit_code == 3 and "unknown adapter 'nope'" in missing.output

    # An older version of json-extract left behind (its name now points at the current one): unused, so it goes.
    older = convert_peft_to_gguf(write_peft_dir(tmp_path / "peft", r=2, tensors=lora_tensors(["q_proj"], rank=2)),
                                 base=base_model, output=tmp_path / "json-extract.gguf").output
    orphan = file_sha256(older).hexdigest()
    shutil.copy(older, store.blob_path(orphan))
    collected = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "gc"])
    assert collected.exit_code == 0 and "verified 2 blobs" in collected.output and "1 unused" in collected.output
    assert not store.blob_path(orphan).exists() and store.blob_path(rows["json-extract"]["sha256"]).exists()
    daemon_like.close()


def test_the_cache_folder_may_follow_the_subcommand(tmp_path: Path, cdn_dir: Path,
                                                    key_pair: tuple[object, object, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 18 item 20: `edge-rt cache ls --cache-dir X` was "no such option".
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cache = synced_cache(tmp_path, cdn_dir, key_pair[2].with_name(key_pair[2].name + ".pub"))
    after = CliRunner().invoke(main, ["cache", "ls", "--json", "--cache-dir", str(cache)])
    before = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "ls", "--json"])
    assert after.exit_code == 0, after.output
    assert sorted(row["name"] for row in json.loads(after.output)) == ["brand-voice", "json-extract"]
    assert json.loads(after.output) == json.loads(before.output)
    collected = CliRunner().invoke(main, ["cache", "gc", "--cache-dir", str(cache)])
    assert collected.exit_code == 0 and "verified 2 blobs" in collected.output


def test_a_mistyped_or_twice_given_cache_dir_is_a_usage_error_and_creates_nothing(tmp_path: Path) -> None:
    # From a new user's walk: `cache ls --cache-dir /typo` said "0 adapters" and created the folder.
    missing = tmp_path / "typo"
    for args in (["cache", "ls", "--cache-dir", str(missing)], ["cache", "--cache-dir", str(missing), "gc"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "does not exist: no adapter cache there" in result.output
    assert not missing.exists()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    twice = CliRunner().invoke(main, ["cache", "--cache-dir", str(tmp_path / "a"), "ls", "--cache-dir",
                                      str(tmp_path / "b")])
    assert twice.exit_code == 2 and "--cache-dir was given twice" in twice.output
