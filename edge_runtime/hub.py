"""Hugging Face Hub access: the one module that imports huggingface_hub.

Sources are written ``hf://ORG/REPO[@REVISION]`` (an adapter directory) or ``hf://ORG/REPO[@REVISION]/PATH``
(one file). huggingface_hub's own cache and ``HF_HUB_OFFLINE`` apply unchanged; ``HF_ENDPOINT`` picks the Hub.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import settings
from edge_runtime.errors import SourceUnavailable

HF_SCHEME = "hf://"
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_SOURCE = re.compile(
    rf"^hf://(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9._/-]{{1,128}}?))?(?:/(?P<path>[^@]+))?$"
)


@dataclass(frozen=True)
class HubSource:
    """A parsed ``hf://`` address."""

    repo_id: str
    revision: str | None
    path: str | None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        tail = f"/{self.path}" if self.path else ""
        return f"{HF_SCHEME}{self.repo_id}{rev}{tail}"


def is_hub_source(text: str) -> bool:
    """True when ``text`` is an ``hf://`` address."""
    return text.startswith(HF_SCHEME)


def parse_hub_source(text: str) -> HubSource:
    """Parse ``hf://ORG/REPO[@REVISION][/PATH]``; raise ``SourceUnavailable`` naming the expected form."""
    match = _SOURCE.match(text)
    if match is None or (match["path"] and ".." in match["path"].split("/")):
        raise SourceUnavailable(
            text,
            "not a valid hf:// address",
            fix="Write it as hf://ORG/REPO, hf://ORG/REPO@REVISION or hf://ORG/REPO/FILE",
        )
    return HubSource(repo_id=match["repo"], revision=match["revision"], path=match["path"])


def fetch_folder(source: HubSource, filenames: list[str]) -> Path:
    """Fetch ``filenames`` of the folder ``source`` names into the Hub cache (or find them there offline)."""
    from huggingface_hub import snapshot_download

    patterns = [f"{source.path}/{name}" if source.path else name for name in filenames]
    with _hub_errors(source):
        folder = snapshot_download(
            repo_id=source.repo_id,
            revision=source.revision,
            allow_patterns=patterns,
            cache_dir=settings.hf_cache_dir(),
            local_files_only=settings.offline(),
            endpoint=settings.hf_endpoint(),
        )
    return Path(folder) / source.path if source.path else Path(folder)


def fetch_file(source: HubSource) -> Path:
    """Fetch the one file ``source`` names into the Hub cache (or find it there offline)."""
    from huggingface_hub import hf_hub_download

    if not source.path:
        raise SourceUnavailable(str(source), "no file named", fix="Write it as hf://ORG/REPO[@REVISION]/FILE.gguf")
    with _hub_errors(source):
        return Path(
            hf_hub_download(
                repo_id=source.repo_id,
                filename=source.path,
                revision=source.revision,
                cache_dir=settings.hf_cache_dir(),
                local_files_only=settings.offline(),
                endpoint=settings.hf_endpoint(),
            )
        )


def file_url(source: HubSource, relative: str) -> str:
    """The HTTP address of ``relative`` inside the folder ``source`` names, at its revision (the Hub's scheme)."""
    from huggingface_hub import hf_hub_url

    path = f"{source.path}/{relative}" if source.path else relative
    return str(hf_hub_url(source.repo_id, path, revision=source.revision, endpoint=settings.hf_endpoint()))


def auth_headers() -> dict[str, str]:
    """``Authorization`` for the Hub token huggingface_hub finds now (``HF_TOKEN`` or a saved login), or nothing."""
    from huggingface_hub import get_token

    token = get_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextmanager
def _hub_errors(source: HubSource) -> Iterator[None]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError as exc:
        raise SourceUnavailable(
            str(source),
            "not in the local Hugging Face cache and the Hub is not reachable (HF_HUB_OFFLINE may be set)",
            fix="Download it once while online, or pass a local directory",
        ) from exc
    except HfHubHTTPError as exc:
        raise SourceUnavailable(
            str(source),
            f"the Hub refused the request: {exc}",
            fix="Check the repository name, the revision and your HF token",
        ) from exc
    except Exception as exc:  # the Hub client's transport errors (DNS, refused, reset) have no common base class
        raise SourceUnavailable(
            str(source),
            f"network or disk error: {exc}",
            fix="Check the connection, or set HF_HUB_OFFLINE=1 to use the local cache",
        ) from exc
