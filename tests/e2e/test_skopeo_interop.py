"""Interop with the container toolchain both ways: skopeo reads what edge-rt pushes, edge-rt pulls what skopeo copies.

``skopeo inspect`` without ``--raw`` refuses every non-image artifact on purpose (containers/image will not read
image-only fields from an artifact's config); ``--raw``, ``--config --raw`` and ``copy`` are how skopeo reads
artifacts, and what these tests use.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from registry import run_registry, skopeo_binary
from test_registry_origin import edge_rt, publish_cli, sha256_of, sync_cli

from edge_runtime.distribution.keys import generate_key


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([skopeo_binary(), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_skopeo_reads_and_copies_the_artifacts_edge_rt_pushes(tmp_path: Path, adapters_dir: Path) -> None:
    key, _ = generate_key(tmp_path / "signing.key")
    with run_registry() as registry:
        publish_cli(adapters_dir, registry, key)
        image = f"docker://{registry.host}/edge/adapters"
        adapter = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"{image}:a").stdout)
        release = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"{image}:edge-rt-manifest").stdout)
        config = skopeo("inspect", "--config", "--raw", "--tls-verify=false", f"{image}:a").stdout
        tags = json.loads(skopeo("list-tags", "--tls-verify=false", image).stdout)["Tags"]
        skopeo("copy", "--src-tls-verify=false", f"{image}:a", f"oci:{tmp_path / 'layout'}:a")
    sha_a = sha256_of(adapters_dir / "a.gguf")
    assert (adapter["mediaType"], adapter["artifactType"]) == ("application/vnd.oci.image.manifest.v1+json",
                                                               "application/vnd.edge-rt.adapter.v1")
    assert adapter["config"]["mediaType"] == "application/vnd.oci.empty.v1+json" and config == "{}"
    [layer] = adapter["layers"]
    assert (layer["mediaType"], layer["digest"], layer["size"]) == (
        "application/vnd.docker.ai.gguf.v3.lora", f"sha256:{sha_a}", (adapters_dir / "a.gguf").stat().st_size)
    assert adapter["annotations"]["dev.edge-rt.adapter.name"] == "a"
    assert adapter["annotations"]["dev.edge-rt.adapter.sha256"] == sha_a
    assert len(adapter["annotations"]["dev.edge-rt.adapter.base-fingerprint"]) == 64
    assert release["layers"][0]["mediaType"] == "application/vnd.edge-rt.manifest.v1+json"
    assert {layer["digest"] for layer in release["layers"][1:]} == \
        {f"sha256:{sha256_of(path)}" for path in adapters_dir.glob("*.gguf")}
    assert sorted(tags) == ["a", "b", "c", "edge-rt-manifest"]
    copied = tmp_path / "layout" / "blobs" / "sha256" / sha_a  # the bytes, through skopeo, into an OCI layout
    assert copied.read_bytes() == (adapters_dir / "a.gguf").read_bytes()


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_release_layout(layout: Path, cdn: Path, tag: str) -> None:
    """An OCI image layout holding a release built from a published folder, written by hand (not by edge-rt)."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    document = _blob(layout, (cdn / "manifest.json").read_bytes())
    layers = [{"mediaType": "application/vnd.edge-rt.manifest.v1+json", **document}]
    for blob in sorted((cdn / "blobs").glob("*.gguf")):
        layers.append({"mediaType": "application/vnd.docker.ai.gguf.v3.lora", **_blob(layout, blob.read_bytes())})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.edge-rt.release.v1",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", **_blob(layout, b"{}")},
                "layers": layers}
    described = _blob(layout, json.dumps(manifest, indent=2).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **described,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


def test_edge_rt_pulls_a_release_skopeo_copied_from_an_oci_layout(tmp_path: Path, adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    published = edge_rt("publish", str(adapters_dir), "--out", str(tmp_path / "cdn"), "--key", str(key),
                        "--allow-renamed")
    assert published.returncode == 0, published.stderr
    write_release_layout(tmp_path / "layout", tmp_path / "cdn", "edge-rt-manifest")
    with run_registry() as registry:
        skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:edge-rt-manifest",
               f"docker://{registry.host}/edge/adapters:edge-rt-manifest")
        synced = sync_cli(registry, public, tmp_path / "cache")
        assert synced.returncode == 0, synced.stderr
        pulled = [entry for entry in registry.log() if entry.method == "GET" and "/blobs/" in entry.path]
    for name in "abc":
        sha = sha256_of(adapters_dir / f"{name}.gguf")
        assert sha256_of(tmp_path / "cache" / "blobs" / f"{sha}.gguf") == sha
    assert len(pulled) == 4 and all(entry.status == 200 for entry in pulled)  # the document and three adapters
