"""FSDP: the real trainer with mesh.strategy="fsdp" equals pure data parallelism, and shards params.

8 simulated CPU devices (tests/conftest.py). Tiny IRRA (sdm+id+mlm) from tests/train_fixtures.py,
2 optimizer steps with IRRA's Adam eps (1e-3). Meshes: data=8 fsdp=1 with strategy "data"
(reference), data=1 fsdp=8 and data=2 fsdp=4 with strategy "fsdp". The only expected difference is
the float32 reduction order of the gathered/scattered gradients.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train_fixtures import flat_params, iterator_from, tiny_config
from xmr_jax import parallel, train

RTOL, ATOL = 1e-4, 2e-6  # float32 reduction-order rounding after 2 Adam steps (as tests/test_train.py)


def _train(tmp_path, name, strategy, data, fsdp):
    config = tiny_config()
    config.num_epochs = 1
    config.optim.eps = 1e-3
    config.ckpt_every_steps = 10 ** 6  # final checkpoint only
    config.mesh.strategy, config.mesh.data, config.mesh.fsdp = strategy, data, fsdp
    return train.train(config, str(tmp_path / name), iterator_from, steps_per_epoch=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert jax.device_count() == 8
    return _train(tmp_path_factory.mktemp("data"), "data", "data", 8, 1)


# Each case trains twice (~40 s per training on 2 shared cores): the HSDP 2x4 mesh runs with -m slow.
@pytest.mark.parametrize("data,fsdp", [(1, 8), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_fsdp_equals_data_parallel_and_shards_params(tmp_path, reference, data, fsdp):
    result = _train(tmp_path, "fsdp", "fsdp", data, fsdp)
    assert dict(result.mesh.shape) == {"data": data, "fsdp": fsdp}
    params = result.state.params
    # The largest kernel (the 49408 x 32 token embedding) is split over the fsdp axis ...
    emb = params["base_model"]["text"]["token_embedding"]["embedding"]
    assert emb.shape == (49408, 32)
    assert emb.sharding.spec == P("fsdp", None), emb.sharding.spec
    assert emb.addressable_shards[0].data.shape == (49408 // fsdp, 32)
    # ... and so is Adam's state for it (same shape -> same rule).
    specs = [x.sharding.spec for x in jax.tree.leaves(result.state.opt_state) if np.shape(x) == emb.shape]
    assert specs and all(s == P("fsdp", None) for s in specs), specs
    # Small leaves (biases, layer norms) stay replicated; the reference is fully replicated.
    ln = params["base_model"]["text"]["ln_final"]["scale"]
    assert ln.sharding.spec == P()
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(reference.state.params))
    # The rule shards every leaf of >= 4096 elements with a dimension divisible by the fsdp size.
    expected = parallel.param_shardings(params, result.mesh, "fsdp")
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.sharding.spec == want.spec
    n_sharded = sum(x.sharding.spec != P() for x in jax.tree.leaves(params))
    assert n_sharded >= 5, n_sharded
    # Same training as pure data parallelism.
    assert int(result.state.step) == int(reference.state.step) == 2
    np.testing.assert_allclose(flat_params(result.state), flat_params(reference.state), rtol=RTOL, atol=ATOL)
