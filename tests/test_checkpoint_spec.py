"""A checkpoint stores the model's spec and parameter layout, and refuses another model by name."""

import numpy as np
import pytest

from mlpcore.errors import UsageError
from mlpcore.nn.layers import Dense
from mlpcore.nn.model import Sequential, mlp_layers
from mlpcore.nn.optim import Adam
from mlpcore.strategies import checkpoint

FINGERPRINT = '{"options": {}, "world_size": 1}'


def model_of(layers, seed=0, dtype=np.float64):
    return Sequential(layers, dtype=dtype, rng=np.random.default_rng(seed), kernels="numpy", name="mlp")


def saved(tmp_path, model):
    """Write ``model``'s checkpoint after epoch 1 and return the plan that resumes from it."""
    rng = np.random.default_rng(1)
    checkpoint.write(tmp_path, 0, epoch=1, losses=[0.5], model=model, optimizer=Adam(model), rng=rng,
                     fingerprint=FINGERPRINT)
    return checkpoint.CheckpointPlan(str(tmp_path), 1, (1,), FINGERPRINT).for_rank(0)


def test_the_same_model_resumes_with_its_parameters(tmp_path):
    a = model_of(mlp_layers(4, (3,), 2), seed=0)
    ckpt = saved(tmp_path, a)
    b = model_of(mlp_layers(4, (3,), 2), seed=7)
    assert not np.array_equal(a.params, b.params)
    epoch, losses = ckpt.restore(b, Adam(b), np.random.default_rng(2))
    assert (epoch, losses) == (1, [0.5])
    assert a.params.tobytes() == b.params.tobytes()


def test_another_width_is_refused_naming_the_layer(tmp_path):
    ckpt = saved(tmp_path, model_of(mlp_layers(4, (3,), 2)))
    other = model_of(mlp_layers(4, (5,), 2))
    with pytest.raises(UsageError, match=r"layer 0 is Dense in=4 out=3 in the checkpoint, Dense in=4 out=5 now"):
        ckpt.restore(other, Adam(other), np.random.default_rng(0))


def test_the_same_flat_size_with_other_layers_is_refused(tmp_path):
    """Dense-ReLU-Dense and Dense-Dense have the same parameters, flat size and layout: only the spec tells."""
    ckpt = saved(tmp_path, model_of(mlp_layers(4, (3,), 3)))
    other = model_of([Dense(4, 3), Dense(3, 3)])
    assert other.params.size == model_of(mlp_layers(4, (3,), 3)).params.size
    with pytest.raises(UsageError, match=r"layer 1 is ReLU in the checkpoint, Dense in=3 out=3 now"):
        ckpt.restore(other, Adam(other), np.random.default_rng(0))


def test_another_dtype_is_refused(tmp_path):
    ckpt = saved(tmp_path, model_of(mlp_layers(4, (3,), 2), dtype=np.float64))
    other = model_of(mlp_layers(4, (3,), 2), dtype=np.float32)
    with pytest.raises(UsageError, match=r"holds a float64 'mlp' model, this run trains a float32 'mlp'"):
        ckpt.restore(other, Adam(other), np.random.default_rng(0))


def test_a_layout_mismatch_names_the_slot():
    spec = model_of(mlp_layers(4, (3,), 2)).spec()
    moved = {**spec, "layout": [dict(spec["layout"][0], start=1, stop=7), *spec["layout"][1:]]}
    with pytest.raises(UsageError, match=r"slot 'weight' of layer 2 lies at 1:7 with shape \(3, 2\)"):
        checkpoint.check_model("ckpt.npz", moved, spec)
