"""xmr_jax.logging_utils: the progress bar (current loss, final line once), the path layer's error
text and write checks, and orbax reads of a checkpoint item without the step-metadata warning."""

import errno
import logging

import jax.numpy as jnp
import pytest

from xmr_jax import checkpoints, logging_utils


def test_progress_bar_shows_the_current_loss_and_its_last_line_once(capsys):
    bar = logging_utils.ProgressBar(total=4)
    bar._bar.mininterval = 0  # draw at every update (a real run draws at most once a second)
    bar.update(2, {"loss": 2.0, "lr": 1e-3})
    bar.update(4, {"loss": 4.0, "lr": 1e-3})
    bar.close()
    frames = [f for f in capsys.readouterr().err.replace("\n", "\r").split("\r") if f.strip()]
    assert "2/4" in frames[1] and "loss=2.0000" in frames[1]  # this interval's loss, not the previous
    assert [f for f in frames if "4/4" in f] == [frames[-1]]  # the final line, once
    assert "loss=4.0000" in frames[-1]


def test_describe_os_error_finds_the_cause():
    assert logging_utils.describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == \
        "No space left on device (errno 28)"
    wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/d/": '
                         "Failed to write 1286144 bytes to file 12: No space left on device [os_error_code='28']")
    assert logging_utils.describe_os_error(wrapped) == "No space left on device (errno 28)"
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied")
        except PermissionError as e:
            raise RuntimeError("commit failed") from e
    except RuntimeError as chained:
        assert logging_utils.describe_os_error(chained) == "Permission denied (errno 13)"
    assert logging_utils.describe_os_error(RuntimeError("first line\nsecond")) == "first line"


def test_check_writable_dir_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(logging_utils.PathCheckError, match=r"^--workdir=.*file: is a file, expected a folder"):
        logging_utils.check_writable_dir(str(tmp_path / "file"))
    with pytest.raises(logging_utils.PathCheckError, match=r"^--out=.*cannot create or write files there: Not a directory"):
        logging_utils.check_writable_dir(str(tmp_path / "file" / "sub"), "--out")
    made = logging_utils.check_writable_dir(str(tmp_path / "a" / "b"))
    assert made == str(tmp_path / "a" / "b") and list((tmp_path / "a" / "b").iterdir()) == []  # no probe left


def test_load_params_reads_an_item_without_orbax_warnings(tmp_path, caplog):
    with checkpoints.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, {"params": {"w": jnp.ones(3)}, "step": jnp.zeros((), jnp.int32)})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        params, step = checkpoints.load_params(str(tmp_path))
    assert step == 3 and float(params["w"].sum()) == 3.0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
