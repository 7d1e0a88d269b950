#!/usr/bin/env bash
# Full-size SD 1.5 at 512x512 on an NVIDIA GPU: ours on JAX (XLA) vs diffusers on the same random
# weights, float32 against float32, then mixed_float16 against diffusers float16. Both runs append
# their tables to benchmarks/RESULTS.md. The GPU machine has no TensorFlow, so ours runs on JAX.
#
#   bash benchmarks/gpu.sh [OUTPUT_FOLDER]    # logs and RESULTS.md copied there
set -o pipefail
out=${1:-/tmp/gpu-bench}
mkdir -p "$out"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, keras, torch, diffusers; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__,
'torch', torch.__version__, 'diffusers', diffusers.__version__)
from stable_diffusion import StableDiffusion
print('demo model on the GPU:', StableDiffusion.from_checkpoint().text_to_image('a red circle', num_steps=2).shape)" || exit 1
common=(--config sd-1.5 --size 512 --steps 20 --repeats 10 --device cuda --folder /tmp/sd15-random)
timeout 320 python3 benchmarks/bench.py "${common[@]}" 2>&1 | grep --line-buffered -v "it/s]" | tee "$out/float32.log"
timeout 220 python3 benchmarks/bench.py "${common[@]}" --dtype-policy mixed_float16 --reference-dtype float16 \
    2>&1 | grep --line-buffered -v "it/s]" | tee "$out/float16.log"
cp benchmarks/RESULTS.md "$out/"
