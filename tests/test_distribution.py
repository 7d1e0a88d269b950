"""Generating across devices with `keras.distribution.DataParallel` (JAX; how Keras runs on TPU pods
and multi-GPU machines), here on 2 virtual CPU devices: a checkpoint loaded under DataParallel has
replicated weights and makes the images of the single-device run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys, jax, keras, numpy as np
from stable_diffusion import StableDiffusion

config = dict(
    text_encoder=dict(width=32, num_layers=1, num_heads=2, intermediate_size=37),
    diffusion_model=dict(channels=(32, 32), layers_per_block=1, attention_levels=(True, False),
                         num_heads=2, context_dim=32, norm_groups=8),
    decoder=dict(channels=(8, 8), layers_per_block=1, norm_groups=4),
    encoder=dict(channels=(8, 8), layers_per_block=1, norm_groups=4))
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
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "bundle")], env=env,
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max difference" in result.stdout
