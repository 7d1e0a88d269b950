"""Generating across devices with `keras.distribution.DataParallel` (JAX; how Keras runs on TPU pods
and multi-GPU machines), here on 2 virtual CPU devices: a checkpoint loaded under DataParallel has
replicated weights and makes the images of the single-device run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference import TINY_CONFIG

SCRIPT = """
import json, sys, jax, keras, numpy as np
from stable_diffusion import StableDiffusion

config = json.loads(sys.argv[2])
keras.utils.set_random_seed(0)
original = StableDiffusion(32, 32, config=config)
single = original.text_to_image(["a", "b", "c", "d"], num_steps=3, seed=1, verbose=False)
original.save(sys.argv[1])
assert len(jax.devices()) == 2, jax.devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
sd = StableDiffusion.from_checkpoint(sys.argv[1])
assert len(sd.diffusion_model.weights[0].value.sharding.device_set) == 2, "weights not replicated"
multi = sd.text_to_image(["a", "b", "c", "d"], num_steps=3, seed=1, verbose=False)
print("max difference", np.abs(single.astype(int) - multi).max())
assert np.abs(single.astype(int) - multi).max() <= 1
"""


def test_data_parallel_equals_single_device(tmp_path):
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "bundle"), json.dumps(TINY_CONFIG)], env=env,
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max difference" in result.stdout
