"""Whether an adapter file was made for the resident base model, decided from its GGUF header alone.

Adapters converted by edge-rt carry the base's fingerprint; adapters from other converters are checked tensor by
tensor against the base's shapes. Either way llama.cpp never sees a file made for another model.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import IncompatibleAdapter, InvalidGGUF
from edge_runtime.files import file_sha256
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, read_header
from edge_runtime.gguf.info import INVOCATION_TOKEN_BYTES, MAX_INVOCATION_TOKENS, check_invocation_length
from edge_runtime.runtime.versions import AdapterVersion

__all__ = ["BaseCompatibility", "file_id"]


def file_id(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime in ns) of ``path``: any replacement or rewrite of the file changes it."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class BaseCompatibility:
    """The resident base model's fingerprint and tensor shapes, against which adapters are checked."""

    def __init__(self, base_header: GGUFHeader, base_fingerprint: str, *, n_ctx: int | None = None) -> None:
        self._base_fingerprint = base_fingerprint
        self._base_shapes = {t.name: t.shape for t in base_header.tensors}
        self._n_ctx = n_ctx  # an aLoRA invocation longer than the context can never be invoked: refused

    def version_for(self, name: str, path: Path, sha256: str | None) -> AdapterVersion:
        """A new cached version of ``name`` for the adapter file ``path``, checked against the base model; hashed
        (when ``sha256`` is None) only once it is known to be a regular GGUF LoRA file."""
        if path.exists() and not path.is_file():  # a folder, FIFO or device would hang or crash the hashing
            raise InvalidGGUF(str(path), "not a regular file")
        header = read_header(path)
        self.check(name, header)
        identity = file_id(path)  # (inode, size, mtime): one stat gives the size too
        end = max((header.data_end(t) for t in header.tensors), default=0)
        if end > identity[1]:  # still being copied, or cut short
            raise InvalidGGUF(
                str(path),
                f"its tensors run past the end of the file ({identity[1]} of {end} bytes: "
                "truncated, or still being written?)",
            )
        invocation = header.fields.get(keys.ALORA_INVOCATION_TOKENS)
        count = 0 if invocation is None else invocation.count
        check_invocation_length(str(path), count, min(MAX_INVOCATION_TOKENS, self._n_ctx or MAX_INVOCATION_TOKENS))
        sha256 = sha256 or file_sha256(path).hexdigest()
        return AdapterVersion(
            name=name,
            path=path,
            sha256=sha256,
            size_bytes=identity[1],
            resident_bytes=sum(t.n_bytes for t in header.tensors) + count * INVOCATION_TOKEN_BYTES,
            file_id=identity,
        )

    def verify_unchanged(self, version: AdapterVersion) -> None:
        """Raise ``InvalidGGUF`` when ``version``'s file no longer holds the content registered as its sha256."""
        if not version.path.exists():  # read_header says so, typed
            return
        if not version.path.is_file():
            raise InvalidGGUF(str(version.path), "not a regular file")
        if file_id(version.path) == version.file_id or file_sha256(version.path).hexdigest() == version.sha256:
            return
        raise InvalidGGUF(
            str(version.path),
            f"changed on disk since it was registered as {version.sha256[:12]}: "
            "the daemon will not serve other bytes under that digest; `kill -HUP` the daemon (or "
            "`systemctl reload`) once the file is complete to register it as the next version",
        )

    def check(self, name: str, header: GGUFHeader) -> None:
        """Raise ``IncompatibleAdapter`` unless ``header`` is a LoRA adapter made for this base model."""
        if header.value(keys.TYPE) != "adapter" or header.value(keys.ADAPTER_TYPE) != "lora":
            raise IncompatibleAdapter(f"{header.path} is not a LoRA adapter", fix="Pass a file made by edge-rt convert")
        fingerprint = header.value(keys.BASE_FINGERPRINT)
        if fingerprint is not None:
            if fingerprint != self._base_fingerprint:
                raise IncompatibleAdapter(
                    f"adapter {name!r} was converted for another base model (fingerprint {str(fingerprint)[:12]}, "
                    f"resident base {self._base_fingerprint[:12]})"
                )
            return
        # Adapters made by other converters carry no fingerprint: check every target tensor's shape instead.
        for tensor in header.tensors:
            target = tensor.name.rsplit(".lora_", 1)[0]
            shape = self._base_shapes.get(target)
            width = tensor.shape[0] if tensor.name.endswith(".lora_a") else tensor.shape[1]
            expected = None if shape is None else shape[0] if tensor.name.endswith(".lora_a") else shape[1]
            if expected != width:
                raise IncompatibleAdapter(f"adapter {name!r} tensor {tensor.name} does not match the base model")
