"""The tiny main-job config of tests/test_main.py, as a config file for `python -m xmr_jax.main`.

    python -m xmr_jax.main --config=tests/main_test_config.py:DATA_DIR --workdir=...

Tiny IRRA towers (tests/train_fixtures.py) on synthetic_people/tiny (12 training identities:
6 steps per epoch at batch 8) stored under DATA_DIR; 2 epochs with an evaluation after each.
Needs the repository root on sys.path (PYTHONPATH or the current directory).
"""

from tests.train_fixtures import tiny_config


def demo_config(data_dir):
    config = tiny_config(batch_size=8)
    config.num_classes = 0  # taken from the data set (12 training identities)
    config.num_epochs = 2
    config.eval_every_epochs = 1  # a periodic evaluation after epoch 1 (step 6), then the final one
    config.data.update(dict(config_name="tiny", data_dir=str(data_dir), image_size=(64, 32)))
    config.model.clip.update(dict(image_size=(64, 32), patch_size=16))
    config.eval_batch_size = 8  # 12 images = 8 + a ragged 4
    return config


def get_config(data_dir):
    return demo_config(data_dir)
