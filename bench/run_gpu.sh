#!/usr/bin/env bash
# The full benchmark suite on a CUDA machine: CSV + markdown + PNG per op into $OUT (when set) or bench/results.
#
# Installs nothing from the network. It needs python3 with a CUDA torch and Triton (what the GPU machines have).
# - fastgrpo comes from this checkout, staged in /tmp with its Triton kernels and (when it builds) the CUDA
#   extension; nothing is pip-installed and nothing is written into the repository.
# - peers (liger-kernel, trl, cut-cross-entropy, and what they import that the machine lacks) come as wheels
#   from .whl/ when that folder exists; bench/README.md says how to fill it. A missing peer is skipped with a note.
#
# Then, when vllm (and trl, peft, datasets) import, one training step on one GPU with vLLM generation:
# fastgrpo + vLLM vs TRL + vLLM colocate, same model and settings (bench/bench_step_vllm.py).
#
# Usage: bash bench/run_gpu.sh [extra arguments of `python -m bench.run`, e.g. --op grpo_loss --case llama3]
#   FASTGRPO_BENCH=ops        the op tables only
#   FASTGRPO_BENCH=step_vllm  the vLLM step comparison only (FASTGRPO_STEP_ARGS="--smoke" for a ~1 min check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "[run_gpu] peers from .whl/: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "[run_gpu] no .whl/ folder: peers not installed on this machine are skipped"
fi

# fastgrpo from this checkout, staged outside it (no pip install, nothing written into the repository): the
# package with kernels/ at fastgrpo/kernels (pyproject's package mapping) and the C++/CUDA extension built into
# the stage. When the extension does not build, the run goes on without it and the `cuda` backend is skipped.
STAGE=${FASTGRPO_STAGE:-/tmp/fastgrpo_stage}
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r fastgrpo "$STAGE/fastgrpo" && rm -rf "$STAGE/fastgrpo/kernels" && cp -r kernels "$STAGE/fastgrpo/kernels"
find "$STAGE" -name "_C*.so" -delete
if [ "${FASTGRPO_NO_EXT:-0}" != 1 ]; then
    if ! FASTGRPO_CUDA_ARCHS=${FASTGRPO_CUDA_ARCHS:-90} "$PY" setup.py -q build_ext --build-lib "$STAGE" \
        --build-temp /tmp/fastgrpo_build >/tmp/fastgrpo_build.log 2>&1; then
        echo "[run_gpu] !! the C++/CUDA extension did not build (tail of /tmp/fastgrpo_build.log below);" \
            "running without it"
        tail -n 20 /tmp/fastgrpo_build.log
    fi
fi
export PYTHONPATH=$STAGE:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import fastgrpo.ops._dispatch as d; print('[run_gpu] fastgrpo backends on cuda:', d.available_backends('cuda'))"

mkdir -p "$OUT_DIR"
WHAT=${FASTGRPO_BENCH:-all}
if [ "$WHAT" != step_vllm ]; then
    "$PY" -m bench.run --op all --device cuda --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/bench_cuda.log"
fi
if [ "$WHAT" != ops ]; then
    # vLLM pins its own CUDA torch: it comes installed on the machine or in .whl/ with everything it needs
    if "$PY" -c "import vllm, trl, peft, datasets" 2>/dev/null; then
        # shellcheck disable=SC2086
        "$PY" -m bench.bench_step_vllm --out "$OUT_DIR" ${FASTGRPO_STEP_ARGS:-} 2>&1 | tee "$OUT_DIR/step_vllm_cuda.log"
    else
        echo "[run_gpu] vllm / trl / peft / datasets not importable: the fastgrpo + vLLM vs TRL + vLLM step" \
            "comparison is skipped (see docs/distributed.md)"
    fi
fi
