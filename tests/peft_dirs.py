"""Writing PEFT adapter folders the way PEFT's save_pretrained lays them out, with numpy (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

# SmolLM2-135M: hidden 576, 9 query heads / 3 KV heads of 64, MLP 1536, 30 layers.
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
# Gemma 3 270M: hidden 640, 4 query heads / 1 KV head of 256, MLP 2048, 18 layers.
GEMMA_SHAPES = {"q_proj": (640, 1024), "k_proj": (640, 256), "v_proj": (640, 256), "o_proj": (1024, 640),
                "gate_proj": (640, 2048), "up_proj": (640, 2048), "down_proj": (2048, 640)}
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

ASSISTANT_TURN = [1, 520, 9531, 198]  # "<|im_start|>assistant\n": SmolLM2's chat template opens every answer with it


def lora_tensors(modules: list[str], *, rank: int = 8, layers: range | list[int] = range(2), seed: int = 0,
                 shapes: dict[str, tuple[int, int]] = SHAPES) -> dict[str, np.ndarray]:
    """Random lora_A (r × in) / lora_B (out × r) matrices keyed as PEFT saves them; ``shapes`` maps each module to
    its (in, out) features (SmolLM2's by default, ``GEMMA_SHAPES`` for Gemma 3 270M)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in layers:
        for module in modules:
            n_in, n_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, n_in)).astype(np.float32) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, rank)).astype(np.float32) * 0.05
    return tensors


def write_peft_dir(directory: Path, *, tensors: dict[str, np.ndarray] | None = None,
                   **config: Any) -> Path:
    """Write adapter_config.json (defaults: r=8, alpha=16, q/k targets) and adapter_model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj"],
                                "bias": "none", "use_dora": False, "modules_to_save": None, "use_rslora": False,
                                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM"}
    settings.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    save_file(tensors if tensors is not None else lora_tensors(["q_proj", "k_proj"], rank=settings["r"]),
              str(directory / "adapter_model.safetensors"))
    return directory
