"""An aLoRA's invocation sequence is bounded at convert, publish and load, and counted in resident memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peft_dirs import ASSISTANT_TURN, lora_tensors, write_peft_dir

from converters import convert_peft_to_gguf
from converters.errors import MalformedAdapter
from edge_runtime.distribution.publish import publish
from edge_runtime.errors import InvalidGGUF
from edge_runtime.gguf.header import read_header
from edge_runtime.gguf.info import INVOCATION_TOKEN_BYTES
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime


@pytest.fixture
def runtime(make_profile: Callable[..., Path]) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(make_profile("alora-bounds", budget_mb=1024))), ctx=512)
    yield rt
    rt.close()


def _alora(folder: Path, name: str, base_model: Path, invocation: list[int]) -> Path:
    peft = write_peft_dir(folder / f"peft-{name}", tensors=lora_tensors(["q_proj"], rank=2), r=2,
                          target_modules=["q_proj"], alora_invocation_tokens=invocation)
    return convert_peft_to_gguf(peft, base=base_model, output=folder / f"{name}.gguf").output


def test_an_invocation_longer_than_any_prompt_is_refused_at_convert_publish_and_load(
        tmp_path: Path, base_model: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 18 item 9: a 16M-token invocation with 60 KB of tensors raised RSS 234 -> 417 MiB while resident_bytes
    # read 61,440, and each request built a 128 MB list from it.
    with pytest.raises(MalformedAdapter, match="9000 tokens long"):
        _alora(tmp_path, "huge", base_model, [5] * 9000)
    longer_than_context = _alora(tmp_path, "long", base_model, [5] * 600)  # fits the bound, not a 512 context
    with pytest.raises(InvalidGGUF, match="600 tokens long .at most 512"):
        runtime.adapters.add("long", longer_than_context)
    assert "long" not in runtime.adapters.names()

    import converters.lora_gguf as lora_gguf

    monkeypatch.setattr(lora_gguf, "MAX_INVOCATION_TOKENS", 1 << 20)  # a file made by a converter without the bound
    source = tmp_path / "publish-src"
    source.mkdir()
    _alora(source, "huge", base_model, [5] * 9000)
    with pytest.raises(InvalidGGUF, match="9000 tokens long"):
        publish(source, tmp_path / "cdn")


def test_the_invocation_counts_in_an_aloras_resident_bytes(tmp_path: Path, base_model: Path,
                                                          runtime: Runtime) -> None:
    path = _alora(tmp_path, "turn", base_model, list(ASSISTANT_TURN))
    tensors = sum(t.n_bytes for t in read_header(path).tensors)
    info = runtime.adapters.add("turn", path)
    assert info.resident_bytes == tensors + len(ASSISTANT_TURN) * INVOCATION_TOKEN_BYTES
