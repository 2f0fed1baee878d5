"""OCI registries as an adapter origin: references, media types and the artifacts edge-rt pushes and reads.

Pure data, no network (``registry.py`` speaks HTTP). A publish to ``oci://HOST[:PORT]/REPO[:TAG]`` leaves in REPO:

- one **adapter artifact** per adapter, tagged with the adapter's name: an OCI image manifest (``artifactType``
  ``application/vnd.edge-rt.adapter.v1``, the empty config ``{}``) whose one layer is the GGUF file, media type
  ``application/vnd.docker.ai.gguf.v3.lora`` (Docker's model specification), with annotations for the name, sha256,
  base fingerprint and description;
- the **release artifact** under TAG (default ``edge-rt-manifest``): an image manifest whose first layer is the signed
  edge-rt ``manifest.json`` (``application/vnd.edge-rt.manifest.v1+json``) and whose other layers are the GGUF blobs
  it lists, so one ``skopeo copy`` of the tag mirrors a whole release and registry garbage collection keeps every
  blob a device may still fetch.

Devices read only the release artifact: its manifest (one conditional GET per refresh: ``If-None-Match`` with the
registry's digest ETag), the signed document, then blobs by digest. The registry moves bytes; edge-rt's signature
decides what a device trusts, exactly as over HTTP.

The config is the OCI empty descriptor, as the image specification's artifact guidance asks. ``skopeo inspect``
refuses non-image artifacts on purpose (containers/image treats image-only fields as meaningless for them);
``skopeo inspect --raw`` and ``skopeo copy`` read them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import InvalidAddress, InvalidManifest

__all__ = [
    "ADAPTER_ARTIFACT_TYPE",
    "DEFAULT_TAG",
    "EMPTY_CONFIG",
    "EMPTY_DIGEST",
    "LORA_LAYER_TYPE",
    "MANIFEST_ARTIFACT_TYPE",
    "MANIFEST_LAYER_TYPE",
    "MAX_OCI_MANIFEST_BYTES",
    "OCI_MANIFEST_TYPE",
    "Descriptor",
    "OciReference",
    "adapter_artifact",
    "is_oci_reference",
    "parse_reference",
    "read_release",
    "release_artifact",
]

OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
LORA_LAYER_TYPE = "application/vnd.docker.ai.gguf.v3.lora"
ADAPTER_ARTIFACT_TYPE = "application/vnd.edge-rt.adapter.v1"
MANIFEST_ARTIFACT_TYPE = "application/vnd.edge-rt.release.v1"
MANIFEST_LAYER_TYPE = "application/vnd.edge-rt.manifest.v1+json"
DEFAULT_TAG = "edge-rt-manifest"
MAX_OCI_MANIFEST_BYTES = 4 << 20  # the distribution registry's own limit on a manifest
ANNOTATION = "dev.edge-rt"

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class OciReference:
    """``oci://HOST[:PORT]/REPO[:TAG]``: a repository on a registry and the tag of its release artifact."""

    host: str  # with the port when one was given
    repository: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.repository}:{self.tag}"

    @property
    def hostname(self) -> str:
        """The host without its port (and without IPv6 brackets)."""
        host = self.host.rsplit(":", 1)[0] if not self.host.endswith("]") and ":" in self.host else self.host
        return host.strip("[]")


def is_oci_reference(text: str) -> bool:
    """True when ``text`` is spelled as a registry reference (``oci://...``)."""
    return text.startswith("oci://")


def parse_reference(text: str) -> OciReference:
    """Parse ``oci://HOST[:PORT]/REPO[:TAG]``; ``InvalidAddress`` (exit 2) names what is malformed."""
    rest = text.removeprefix("oci://").rstrip("/")
    host, _, path = rest.partition("/")
    before, _, after = rest.rpartition("@")
    if before and _DIGEST.fullmatch(after) and "@" not in before:  # REPO@sha256:...: a digest never changes
        raise InvalidAddress(
            text,
            f"{after!r} is a digest; edge-rt follows a release by its tag",
            fix="Name the tag: oci://HOST[:PORT]/REPOSITORY[:TAG] (default edge-rt-manifest)",
        )
    if before:  # oci://USER:PASSWORD@HOST/...: never echo what comes before the '@' (a password, maybe with '/')
        raise InvalidAddress(
            "oci://" + after,
            "credentials do not belong in an oci:// reference (it is printed in messages and process listings)",
            fix="Give them in EDGE_RT_REGISTRY_USERNAME/PASSWORD or with `docker login`",
        )
    tag = DEFAULT_TAG
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
    problem = None
    port = host.rpartition(":")[2] if not host.endswith("]") and ":" in host else ""
    if not _HOST.fullmatch(host):
        problem = f"{host!r} is not a registry host[:port]"
    elif port and not 1 <= int(port) <= 65535:
        problem = f"port {port} is not between 1 and 65535"
    elif not path or not _REPOSITORY.fullmatch(path) or len(path) > 255:
        problem = f"{path!r} is not a repository name (lowercase letters, digits, '.', '_', '-', '/' between parts)"
    elif not _TAG.fullmatch(tag):
        problem = f"{tag!r} is not a tag (letters, digits, '_', '.', '-'; at most 128)"
    if problem is not None:
        raise InvalidAddress(text, problem, fix="Spell a registry as oci://HOST[:PORT]/REPOSITORY[:TAG]")
    return OciReference(host=host, repository=path, tag=tag)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about one blob."""

    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data

    @property
    def sha256(self) -> str:
        """The hex digest (descriptors edge-rt reads are sha256 only)."""
        return self.digest.removeprefix("sha256:")


def _image_manifest(artifact_type: str, layers: list[Descriptor], annotations: dict[str, str]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_TYPE,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_CONFIG_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_CONFIG)},
        "layers": [layer.to_dict() for layer in layers],
        "annotations": annotations,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def adapter_artifact(
    *, name: str, sha256: str, size: int, base_fingerprint: str, rank: int, description: str, created: str
) -> bytes:
    """The image manifest of one adapter: its GGUF as the one layer, the manifest entry's fields as annotations."""
    layer = Descriptor(LORA_LAYER_TYPE, f"sha256:{sha256}", size, (("org.opencontainers.image.title", f"{name}.gguf"),))
    return _image_manifest(
        ADAPTER_ARTIFACT_TYPE,
        [layer],
        {
            f"{ANNOTATION}.adapter.name": name,
            f"{ANNOTATION}.adapter.sha256": sha256,
            f"{ANNOTATION}.adapter.base-fingerprint": base_fingerprint,
            f"{ANNOTATION}.adapter.rank": str(rank),
            "org.opencontainers.image.description": description,
            "org.opencontainers.image.created": created,
            "org.opencontainers.image.title": name,
        },
    )


def release_artifact(*, document: Descriptor, blobs: list[Descriptor], version: int, created: str) -> bytes:
    """The image manifest of a release: the signed document first, then every GGUF blob it lists."""
    return _image_manifest(
        MANIFEST_ARTIFACT_TYPE,
        [document, *blobs],
        {
            f"{ANNOTATION}.manifest.version": str(version),
            "org.opencontainers.image.created": created,
        },
    )


def read_release(body: bytes, *, source: str) -> Descriptor:
    """The descriptor of the signed document in a release artifact; ``InvalidManifest`` when there is none."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, a 5,000-digit number, absurd nesting
        raise InvalidManifest(source, None, f"the registry manifest is not JSON ({str(exc)[:200]})") from exc
    if not isinstance(data, dict) or data.get("schemaVersion") != 2:
        raise InvalidManifest(source, "schemaVersion", "not an OCI image manifest (schemaVersion 2)")
    if data.get("mediaType", OCI_MANIFEST_TYPE) != OCI_MANIFEST_TYPE:
        raise InvalidManifest(source, "mediaType", f"{data.get('mediaType')!r} is not {OCI_MANIFEST_TYPE}")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest(source, "layers", "missing or not a list")
    found = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == MANIFEST_LAYER_TYPE]
    if len(found) != 1:
        raise InvalidManifest(
            source,
            "layers",
            f"{len(found)} layers of type {MANIFEST_LAYER_TYPE}, expected one (is this tag an edge-rt release?)",
        )
    digest, size = found[0].get("digest"), found[0].get("size")
    if not isinstance(digest, str) or not _SHA256_DIGEST.fullmatch(digest):
        raise InvalidManifest(source, "layers[].digest", f"{digest!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidManifest(source, "layers[].size", f"{size!r} is not a positive size")
    return Descriptor(MANIFEST_LAYER_TYPE, digest, size)
