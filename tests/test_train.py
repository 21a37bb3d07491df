"""Trainer: loss goes down, 8 devices == 1 device, resume == uninterrupted, SIGTERM, bad configs,
and the model-family seam (a toy family defined here trains and evaluates through the unchanged
trainer and evaluator).

Runs the real train loop (`xmr_jax.train.train`) on deterministic synthetic numpy batches with a
tiny IRRA (sdm+id), so these tests need no TensorFlow.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest

from tests.train_fixtures import (CONTEXT, TOY_KERNEL, TOY_WIDTH, ToyFamily, ToyModel, batch_for_step, flat_params,
                                  iterator_from, tiny_config)
from xmr_jax import checkpoints, train
from xmr_jax.models import families


def test_loss_decreases(tmp_path, capsys):
    config = tiny_config()
    config.num_epochs = 1
    config.log_every = 1
    pulled = []
    result = train.train(config, str(tmp_path), lambda s: iterator_from(s, pulled.append), steps_per_epoch=30)
    # The parameter table is printed once, at the start.
    out = capsys.readouterr().out
    assert out.count("Parameters: ") == 1 and "classifier/kernel" in out
    # batches are placed one step ahead, but never one beyond the last step
    assert pulled == list(range(1, 31))
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in open(tmp_path / "metrics.jsonl") if '"split": "train"' in line]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert int(result.state.step) == 30
    assert (tmp_path / "tensorboard").is_dir()


def test_eight_devices_equal_one_device(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config()
    config.num_epochs = 1
    # IRRA's Adam eps (1e-3) keeps near-zero gradients from being blown up to +-lr by Adam's
    # normalization, so the comparison sees only the float32 rounding of the reductions.
    config.optim.eps = 1e-3
    one = train.train(config, str(tmp_path / "one"), iterator_from, steps_per_epoch=2, devices=jax.devices()[:1])
    eight = train.train(config, str(tmp_path / "eight"), iterator_from, steps_per_epoch=2)
    assert len(jax.tree.leaves(eight.state.params)[0].sharding.device_set) == 8
    # Same math, different reduction order across devices: float32 rounding only.
    np.testing.assert_allclose(flat_params(one.state), flat_params(eight.state), rtol=1e-4, atol=2e-6)


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny_config()
    full = train.train(config, str(tmp_path / "full"), iterator_from, steps_per_epoch=4)

    def stop_at_5(step):
        if step == 5:
            checkpoints.request_stop()

    part_dir = str(tmp_path / "part")
    pulled = []
    first = train.train(config, part_dir, lambda s: iterator_from(s, lambda i: (pulled.append(i), stop_at_5(i))),
                        steps_per_epoch=4)
    # Batch 5 is pulled (stop requested) while step 4 runs; step 5 is the step running when the
    # stop is seen: it is the one saved, and no batch is pulled beyond it.
    assert first.stopped and int(first.state.step) == 5
    assert pulled == [1, 2, 3, 4, 5]
    assert checkpoints.Checkpointer(part_dir).all_steps() == [2, 4, 5]
    resumed = train.train(config, part_dir, iterator_from, steps_per_epoch=4)
    assert not resumed.stopped and int(resumed.state.step) == 8
    np.testing.assert_allclose(flat_params(full.state), flat_params(resumed.state), rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    def sigterm_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    received = []

    def outer_handler(signum, frame):  # the handler the caller had before train()
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, outer_handler)
    try:
        config = tiny_config()
        result = train.train(config, str(tmp_path), lambda s: iterator_from(s, sigterm_at_3), steps_per_epoch=4)
        # The trainer's handler took the signal (the caller's never ran) and put the caller's back.
        assert received == []
        assert signal.getsignal(signal.SIGTERM) is outer_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.stopped
    assert checkpoints.Checkpointer(str(tmp_path)).latest_step() == 3  # not only at log steps
    resumed = train.train(config, str(tmp_path), iterator_from, steps_per_epoch=4)
    assert int(resumed.state.step) == 8


def test_stop_before_the_first_step_saves_nothing(tmp_path):
    pulled = []
    checkpoints.request_stop()  # e.g. SIGTERM while the step was compiling
    result = train.train(tiny_config(), str(tmp_path), lambda s: iterator_from(s, pulled.append), steps_per_epoch=4)
    assert result.stopped and int(result.state.step) == 0 and pulled == []
    assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == []
    assert not checkpoints.stop_requested()  # the flag does not leak into the next run


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(start):
        for step, batch in enumerate(iterator_from(start), start=start + 1):
            if step >= 5:
                batch["images"] = np.full_like(batch["images"], np.nan)
            yield batch

    config = tiny_config()
    config.async_checkpoints = True  # the message waits for the pending save before it tells
    with pytest.raises(train.TrainingDiverged, match="NaN/Inf between steps 5 and 6.*last good checkpoint is step 4 in "):
        train.train(config, str(tmp_path), poisoned, steps_per_epoch=4)
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 4


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    def poisoned(start):
        for batch in iterator_from(start):
            batch["images"] = np.full_like(batch["images"], np.nan)
            yield batch

    with pytest.raises(train.TrainingDiverged) as err:
        train.train(tiny_config(), str(tmp_path), poisoned, steps_per_epoch=4)
    assert "No checkpoint was written" in str(err.value) and "last good" not in str(err.value)
    assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == []


def test_nonfinite_step_keeps_params_and_optimizer_state():
    """A NaN loss leaves params and opt_state bit for bit; step and the nonfinite count advance."""
    import optax

    from xmr_jax import optim
    from xmr_jax.models.families import get_family

    config = tiny_config()
    config.optim.eps = 1e-3  # as the other exactness tests: no blow-up of near-zero gradients
    family = get_family(config.model_family)
    model = family.build(config)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=4)
    loss_fn = family.loss_fn(config)
    step = jax.jit(train.make_train_step(model, loss_fn, tx))
    state, _ = step(train.create_train_state(params, tx), batch_for_step(1))
    bad = batch_for_step(2)
    bad["images"] = np.full_like(bad["images"], np.nan)
    after, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(state.step) + 1 == 2
    assert int(after.nonfinite) == int(state.nonfinite) + 1 == 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A finite step does update (and matches the plain, unguarded optax update).
    good, _ = step(state, batch_for_step(2))
    assert int(good.nonfinite) == 0

    @jax.jit
    def plain(state, batch):
        grads = jax.grad(lambda p: loss_fn(model.apply({"params": p}, batch), batch)[0])(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    want, opt_state = plain(state, batch_for_step(2))
    for a, b in zip(jax.tree.leaves((want, opt_state)), jax.tree.leaves((good.params, good.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(flat_params(state), flat_params(good))


@pytest.mark.parametrize("field,value,message", [
    ("loss_names", "sdm+foo", "config.loss_names='sdm\\+foo'.*unknown loss \\['foo'\\]"),
    ("batch_size", 12, "config.batch_size=12 must be a positive multiple of the number of devices in the mesh \\(8"),
    ("precision", "fp8", "config.precision='fp8'"),
    ("model_family", "bert", "config.model_family='bert'"),
])
def test_bad_config_names_the_field(field, value, message):
    config = tiny_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        train.validate_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("optim.param_groups", [("cross(", 5.0, None)], "config.optim.param_groups\\[0\\]: 'cross\\(' is not a regular expression"),
    ("mesh.rules", [("token_embedding", "rows")], "config.mesh.rules\\[0\\]: spec 'rows'"),
    ("mesh.rules", [("[", "fsdp")], "config.mesh.rules\\[0\\]: '\\[' is not a regular expression"),
])
def test_bad_rules_name_the_field(field, value, message):
    config = tiny_config()
    node, key = field.split(".")
    config[node][key] = value
    with pytest.raises(ValueError, match=message):
        train.validate_config(config)


def test_parameter_table_and_regex_rules():
    """Regex parameter groups (later rules override earlier ones) and sharding rules (first match
    wins, optimizer moments follow their parameter), as the trainer applies them and prints them."""
    from jax.sharding import PartitionSpec as P

    from xmr_jax import optim, parallel

    config = tiny_config()
    config.optim.param_groups = [("^classifier/", 5.0, None), ("/bias$", 2.0, 0.0)]
    config.mesh.strategy, config.mesh.data, config.mesh.fsdp = "fsdp", 1, 8
    config.mesh.rules = [("token_embedding", ("fsdp", None)), ("visual/", "replicated"), ("text_projection", "fsdp")]
    train.validate_config(config)
    model = families.get_family("irra").build(config)
    tx, _ = optim.make_optimizer(config.optim, train.abstract_params(model, config), 2)
    init = train.sharded_init(model, config, tx, parallel.make_mesh(1, 8))
    specs = jax.tree.map(lambda s: s.spec, init.shardings)
    emb = ("base_model", "text", "token_embedding", "embedding")
    get = lambda tree: tree[emb[0]][emb[1]][emb[2]][emb[3]]  # noqa: E731
    assert get(specs.params) == P("fsdp", None)
    moments = [spec for path, spec in jax.tree_util.tree_leaves_with_path(
        specs.opt_state, is_leaf=lambda x: isinstance(x, P)) if "token_embedding" in parallel.path_name(path)]
    assert moments == [P("fsdp", None)] * 2  # Adam's mu and nu follow their parameter
    # The strategy ("fsdp": largest divisible dimension, >= 4096 values) where no rule matches;
    # "visual/" keeps the 4096-value MLP kernels of the image tower replicated.
    text_fc = specs.params["base_model"]["text"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    visual_fc = specs.params["base_model"]["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    assert (text_fc, visual_fc) == (P(None, "fsdp"), P())
    assert specs.params["base_model"]["text"]["text_projection"] == P()  # 32x32 < 4096: "fsdp" replicates

    table = train.param_table(config, init.abstract.params, init.shardings.params).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert rows["classifier/kernel"] == ["32x6", "5", "0.05", "replicated", "1"]
    assert rows["classifier/bias"] == ["6", "2", "0", "replicated", "1"]
    assert rows["base_model/text/token_embedding/embedding"] == ["49408x32", "1", "0.05", "(fsdp,", "-)", "1"]
    assert rows["base_model/text/transformer/resblocks_*/mlp/c_fc/kernel"][-2:] == ["fsdp)", "1"]
    assert rows["base_model/visual/transformer/resblocks_*/ln_*/bias"] == ["32", "2", "0", "replicated", "2"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(init.abstract.params))
    assert table[0].startswith(f"Parameters: {len(jax.tree.leaves(init.abstract.params))} arrays, {n:,} values")


def test_missing_init_checkpoint_names_the_field(tmp_path):
    config = tiny_config()
    config.model.init_checkpoint = str(tmp_path / "ViT-B-16.pt")
    with pytest.raises(FileNotFoundError, match="config.model.init_checkpoint=.*ViT-B-16.pt.*does not exist"):
        train.validate_config(config)


# ----------------------------------------------------------------------------------------------
# The model-family seam: a family the library has never seen, registered here
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def toy_config():
    families.register(ToyFamily())
    config = tiny_config(model_family="toy", loss_names="whatever the toy ignores")
    config.model.toy_width = TOY_WIDTH
    config.model.toy_scale = 3.0
    config.num_epochs = 1
    config.log_every = 1
    yield config
    families.unregister("toy")


def test_a_new_family_trains_and_evaluates_through_the_unchanged_trainer(toy_config, tmp_path):
    from xmr_jax import evaluate, optim, parallel

    config = toy_config
    train.validate_config(config)
    result = train.train(config, str(tmp_path), iterator_from, steps_per_epoch=2)
    assert int(result.state.step) == 2 and isinstance(result.model, ToyModel)
    assert set(result.state.params) == {"image_proj", "text_embed", "text_proj"}
    # The loss the trainer logged at step 1 is the toy loss of the initial parameters on batch 1.
    family = families.get_family("toy")
    model = family.build(config)
    init = train.init_params(model, config, jax.random.PRNGKey(config.seed))
    batch = batch_for_step(1)
    want, _ = family.loss_fn(config)(model.apply({"params": init}, batch), batch)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    np.testing.assert_allclose(train_rows[0]["loss"], float(want), rtol=1e-5)
    np.testing.assert_allclose(train_rows[0]["toy_loss"], float(want), rtol=1e-5)
    assert not np.array_equal(flat_params(result.state), np.concatenate([np.ravel(x) for x in jax.tree.leaves(init)]))

    # The family's pretrained subtree replaces the random init, placed in the state's shardings.
    config.model.toy_init = True
    tx, _ = optim.make_optimizer(config.optim, train.abstract_params(model, config), 2)
    state, _ = train.init_train_state(model, config, tx, parallel.make_mesh(-1, 1), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(state.params["image_proj"]["kernel"]), np.float32(TOY_KERNEL))
    np.testing.assert_array_equal(np.asarray(state.params["text_proj"]["kernel"]),
                                  np.asarray(init["text_proj"]["kernel"]))

    # The evaluator the config asks for (person retrieval), on features with a known answer:
    # image i encodes to e_i, caption j (one word, id perm[j] + 1) to e_perm[j], and caption j
    # belongs to pid j, so its top-1 image is right exactly where perm[j] == j (2 of 8: R1 = 25).
    perm = np.array([0, 2, 1, 3, 5, 6, 7, 4])
    ids = np.arange(8, dtype=np.int32)
    images = np.zeros((8, 16, 16, 3), np.float32)
    images.reshape(8, -1)[ids, ids] = 1.0
    text_ids = np.zeros((8, CONTEXT), np.int32)
    text_ids[:, 0] = perm + 1
    embed = np.zeros((64, TOY_WIDTH), np.float32)
    embed[ids + 1, ids] = 1.0
    params = {"image_proj": {"kernel": np.eye(16 * 16 * 3, TOY_WIDTH, dtype=np.float32),
                             "bias": np.zeros(TOY_WIDTH, np.float32)},
              "text_embed": {"embedding": embed},
              "text_proj": {"kernel": np.eye(TOY_WIDTH, dtype=np.float32), "bias": np.zeros(TOY_WIDTH, np.float32)}}
    gallery = lambda: iter([{"images": images, "pids": ids, "image_ids": ids, "valid": np.ones(8, bool)}])
    queries = lambda: iter([{"text_ids": text_ids, "pids": ids, "image_ids": ids, "valid": np.ones(8, bool)}])
    evaluator = evaluate.Evaluator.for_config(model, parallel.make_mesh(-1, 1), gallery, queries, config)
    assert evaluator.kind == "person"
    metrics = evaluator.run(params)
    assert (metrics["num_queries"], metrics["num_gallery"]) == (8, 8)
    assert metrics["R1"] == pytest.approx(25.0) and metrics["R10"] == pytest.approx(100.0)


def test_family_validation_runs_from_validate_config(toy_config):
    toy_config.model.toy_width = 0
    with pytest.raises(ValueError, match="config.model.toy_width=0: expected > 0"):
        train.validate_config(toy_config)
