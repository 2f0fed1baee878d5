"""Reading a Hugging Face PEFT LoRA directory: its config, its A/B matrices, and every option that changes the math.

The config is a third-party file, so unknown keys are ignored; options whose math a GGUF LoRA cannot express are
refused with ``UnsupportedAdapterFeature``. Tensors are read with safetensors (no pickle, ever) and may be stored
as F32, F16 or BF16; BF16 is widened to F32 with numpy, so torch is not needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors

from converters.errors import AdapterFilesMissing, MalformedAdapter, UnsupportedAdapterFeature
from edge_runtime import hub
from edge_runtime.errors import FileTooLarge
from edge_runtime.files import read_bounded

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 16 << 30

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")

# Options that change the forward pass in a way a GGUF LoRA (y += scale * B A x) cannot express.
_REFUSED_FLAGS: dict[str, str] = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude vector; merge the adapter into the base "
    "model (PEFT's merge_and_unload) and convert the merged model instead",
    "lora_bias": "LoRA biases add a learned vector llama.cpp's LoRA cannot hold; retrain with lora_bias=False",
    "use_qalora": "QA-LoRA pools the input before lora_A; merge it into the base model instead",
    "fan_in_fan_out": "fan_in_fan_out=True is for Conv1D layers that store weights transposed (GPT-2 style), which "
    "the supported architectures do not have; retrain with fan_in_fan_out=False, or merge the "
    "adapter and convert the merged model",
}
_REFUSED_WHEN_SET: dict[str, str] = {
    "modules_to_save": "fully trained copies of whole modules are not LoRA tensors; retrain without "
    "modules_to_save, or merge the adapter and convert the merged model",
    "layer_replication": "layer replication changes the model's layer stack; merge the adapter instead",
    "target_parameters": "LoRA on raw parameters (MoE experts) has no GGUF LoRA form; target modules instead",
    "trainable_token_indices": "trained token embeddings change the embedding table; retrain without them",
    "arrow_config": "Arrow routing mixes several LoRAs per token; export each expert as its own adapter",
    "monteclora_config": "MonteCLoRA samples its weights; export a plain LoRA",
    "kasa_config": "KaSA rescales singular values at run time; merge the adapter instead",
    "use_bdlora": "block-diagonal LoRA is not supported; train a plain LoRA",
}


@dataclass(frozen=True)
class PeftConfig:
    """The fields of ``adapter_config.json`` that decide what the adapter computes."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | None
    base_model_name_or_path: str | None
    alora_invocation_tokens: tuple[int, ...] | None = None  # an activated LoRA (PEFT >= 0.17)
    invocation_string: str | None = None  # an older aLoRA's invocation, to tokenize with the base's vocabulary

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> PeftConfig:
        """Validate a parsed ``adapter_config.json``; refuse unsupported features with a typed error."""
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise UnsupportedAdapterFeature("peft_type", peft_type, fix="Only LoRA adapters can become GGUF LoRAs")
        for flag, fix in _REFUSED_FLAGS.items():
            if data.get(flag):
                raise UnsupportedAdapterFeature(flag, data[flag], fix=fix)
        for option, fix in _REFUSED_WHEN_SET.items():
            if data.get(option):
                raise UnsupportedAdapterFeature(option, data[option], fix=fix)
        if data.get("bias", "none") != "none":
            raise UnsupportedAdapterFeature(
                "bias",
                data["bias"],
                fix="GGUF LoRAs carry no biases; retrain with "
                "bias='none', or merge the adapter and convert the merged model",
            )
        r = _positive_int(data.get("r", 8), "r", source)
        targets = data.get("target_modules")
        layers = data.get("layers_to_transform")
        return cls(
            r=r,
            lora_alpha=_number(data.get("lora_alpha", 8), "lora_alpha", source),
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern={
                str(k): _positive_int(v, f"rank_pattern[{k}]", source)
                for k, v in (data.get("rank_pattern") or {}).items()
            },
            alpha_pattern={
                str(k): _number(v, f"alpha_pattern[{k}]", source) for k, v in (data.get("alpha_pattern") or {}).items()
            },
            target_modules=targets if isinstance(targets, str) or targets is None else tuple(map(str, targets)),
            layers_to_transform=(layers,) if isinstance(layers, int) else tuple(layers) if layers else None,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            alora_invocation_tokens=_token_ids(data.get("alora_invocation_tokens"), source),
            invocation_string=_invocation_string(data.get("invocation_string"), source),
        )

    @property
    def is_alora(self) -> bool:
        """True for an activated LoRA: it applies only from its invocation sequence on."""
        return bool(self.alora_invocation_tokens) or bool(self.invocation_string)

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern`` overrides ``r``)."""
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """The alpha PEFT gives ``module`` (``alpha_pattern`` overrides ``lora_alpha``)."""
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        """PEFT's multiplier on B·A for ``module``: alpha/r, or alpha/√r with rsLoRA."""
        rank = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` selects ``module`` (PEFT's rules: regex full match, or name suffix)."""
        if self.target_modules is None or self.target_modules == "all-linear":
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return any(module == t or module.endswith(f".{t}") for t in self.target_modules)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: its Hugging Face module path and its A (r × in) and B (out × r) matrices, as float32."""

    module: str
    lora_a: np.ndarray
    lora_b: np.ndarray

    @property
    def rank(self) -> int:
        """The pair's rank, from the tensor shapes."""
        return int(self.lora_a.shape[0])


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter read from disk: config, pairs in file order, and the digest of the config bytes."""

    directory: Path
    config: PeftConfig
    pairs: tuple[LoraPair, ...]
    config_sha256: str
    source_bytes: int


def resolve_peft_dir(source: str | Path) -> Path:
    """A local PEFT directory for ``source``: the path itself, or the Hub cache folder of ``hf://ORG/REPO[@REV]``."""
    if isinstance(source, str) and hub.is_hub_source(source):
        return hub.fetch_folder(hub.parse_hub_source(source), [CONFIG_FILE, WEIGHTS_FILE])
    return Path(source).expanduser()


def read_peft_adapter(directory: Path) -> PeftAdapter:
    """Read and validate the PEFT adapter in ``directory``; every inconsistency raises a typed error."""
    config_path, weights_path = _locate_files(directory)
    raw_config = _read_bounded(config_path, MAX_CONFIG_BYTES)
    try:
        data = json.loads(raw_config)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedAdapter(
            str(config_path), f"not valid JSON ({exc})", fix="Re-save the adapter with PEFT's save_pretrained"
        ) from exc
    if not isinstance(data, dict):
        raise MalformedAdapter(str(config_path), "the JSON document is not an object")
    config = PeftConfig.from_dict(data, source=str(config_path))
    pairs = _read_pairs(weights_path, config)
    return PeftAdapter(
        directory=directory,
        config=config,
        pairs=pairs,
        config_sha256=hashlib.sha256(raw_config).hexdigest(),
        source_bytes=weights_path.stat().st_size,
    )


def _locate_files(directory: Path) -> tuple[Path, Path]:
    if not directory.is_dir():
        raise AdapterFilesMissing(
            str(directory), "not a directory", fix="Pass the folder PEFT's save_pretrained wrote, or hf://ORG/REPO"
        )
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterFilesMissing(
            str(directory),
            f"{CONFIG_FILE} is missing",
            fix="Pass the folder PEFT's save_pretrained wrote (it holds adapter_config.json)",
        )
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_FILE).is_file():
            raise AdapterFilesMissing(
                str(directory),
                f"only {PICKLE_WEIGHTS_FILE} (a pickle) is present; edge-rt never loads pickles",
                fix="Re-save the adapter with "
                "save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors",
            )
        raise AdapterFilesMissing(
            str(directory), f"{WEIGHTS_FILE} is missing", fix="Pass the folder PEFT's save_pretrained wrote"
        )
    return config_path, weights_path


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        return read_bounded(path, limit)
    except FileTooLarge as exc:
        raise MalformedAdapter(str(path), f"larger than {limit} bytes", fix="This is not a PEFT file") from exc


def _read_pairs(weights_path: Path, config: PeftConfig) -> tuple[LoraPair, ...]:
    raw = _read_bounded(weights_path, MAX_WEIGHTS_BYTES)
    try:
        entries = safetensors.deserialize(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError and sometimes plain exceptions
        raise MalformedAdapter(
            str(weights_path), f"corrupt safetensors file ({exc})", fix="Re-download or re-save the adapter"
        ) from exc
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, entry in entries:
        module, kind = _split_key(str(key), weights_path)
        found.setdefault(module, {})[kind] = _to_float32(entry, key, weights_path)
    return tuple(_make_pair(module, halves, config, weights_path) for module, halves in found.items())


def _split_key(key: str, weights_path: Path) -> tuple[str, str]:
    match = _KEY.match(key)
    if match is None:
        raise MalformedAdapter(
            str(weights_path),
            f"tensor {key!r} is not a LoRA A/B matrix",
            fix="Only LoRA matrices can be converted; retrain without extra trainable modules",
        )
    kind = match["kind"]
    if kind == "lora_magnitude_vector":
        raise UnsupportedAdapterFeature("use_dora", True, fix=_REFUSED_FLAGS["use_dora"])
    if kind.startswith("lora_embedding"):
        raise UnsupportedAdapterFeature(
            "embedding LoRA", match["module"], fix="Remove the embedding layer from target_modules and retrain"
        )
    return match["module"], kind


def _to_float32(entry: dict[str, Any], key: str, weights_path: Path) -> np.ndarray:
    dtype, shape, data = entry["dtype"], tuple(entry["shape"]), entry["data"]
    if dtype == "F32":
        array = np.frombuffer(data, dtype="<f4")
    elif dtype == "F16":
        array = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        # bfloat16 is the upper half of a float32: widen by shifting the 16 bits into place.
        array = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise MalformedAdapter(
            str(weights_path),
            f"tensor {key!r} has dtype {dtype}",
            fix="Save the adapter in float32, float16 or bfloat16",
        )
    if len(shape) != 2:
        raise MalformedAdapter(str(weights_path), f"tensor {key!r} has shape {list(shape)}, expected a matrix")
    return array.reshape(shape)


def _make_pair(module: str, halves: dict[str, np.ndarray], config: PeftConfig, weights_path: Path) -> LoraPair:
    if set(halves) != {"lora_A", "lora_B"}:
        missing = ({"lora_A", "lora_B"} - set(halves)).pop()
        raise MalformedAdapter(
            str(weights_path),
            f"module {module} has no {missing} tensor",
            fix="The file is incomplete; re-save the adapter",
        )
    lora_a, lora_b = halves["lora_A"], halves["lora_B"]
    if lora_a.shape[0] != lora_b.shape[1]:
        raise MalformedAdapter(
            str(weights_path),
            f"module {module}: lora_A has rank {lora_a.shape[0]} but lora_B has rank {lora_b.shape[1]}",
            fix="The A and B matrices must come from one LoRA layer",
        )
    expected = config.rank_for(module)
    if lora_a.shape[0] != expected:
        raise MalformedAdapter(
            str(weights_path),
            f"module {module}: tensors have rank {lora_a.shape[0]} but adapter_config.json gives it rank {expected}",
            fix="The config and weights come from different adapters; re-save them together",
        )
    if not config.targets(module):
        raise MalformedAdapter(str(weights_path), f"module {module} has LoRA tensors but is not in target_modules")
    layers = config.layers_to_transform
    index = _LAYER_INDEX.search(module)
    if layers is not None and index is not None and int(index.group(1)) not in layers:
        raise MalformedAdapter(str(weights_path), f"module {module} is outside layers_to_transform {list(layers)}")
    return LoraPair(module=module, lora_a=lora_a, lora_b=lora_b)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's get_pattern_key: the first pattern that matches the end of the module path at a '.' boundary.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MalformedAdapter(source, f"{name} must be a positive integer, got {value!r}")
    return value


def _token_ids(value: Any, source: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 1 << 32 for t in value)
    ):
        raise MalformedAdapter(
            source, f"alora_invocation_tokens must be a non-empty list of token ids, got {str(value)[:200]}"
        )
    return tuple(value)


def _invocation_string(value: Any, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise MalformedAdapter(source, f"invocation_string must be non-empty text, got {str(value)[:200]!r}")
    return value


def _number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedAdapter(source, f"{name} must be a finite number, got {value!r}")
    return float(value)
