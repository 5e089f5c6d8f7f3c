"""Training survives kills, torn checkpoints and bad images, and its errors name the problem (issue 7)."""
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from replknet_fn import build_replknet
from replknet_fn.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    read_checkpoint,
    restore_train_state,
    save_train_state,
)
from replknet_fn.config import DEFAULTS, Config, ConfigError
from replknet_fn.data import DataError
from replknet_fn.demo_data import ensure_demo_dataset
from replknet_fn.optim import create_optimizer
from replknet_fn.train_state import TrainState, create_loss_scale

import train_with_func
from conftest import ROOT, final_weights, run_args


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return Path(ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=6,
                                    num_val_per_class=3, image_size=32))


def train_command(data_dir, ckpt_dir, *extra):
    # Eager (--jit False) to spare five compilations; test_train.py checks resume under jit.
    return [sys.executable, "train_with_func.py", *run_args(data_dir, ckpt_dir, "--ckpt_save_steps", "1",
                                                              "--log_interval", "1", "--jit", "False", *extra)]


def run_until_step(command, stop_at, timeout=300):
    """Run training and SIGKILL it as soon as it logs global step `stop_at` (6 steps per epoch); the kill lands
    wherever the process is then, possibly inside a checkpoint save."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    epoch, batch = divmod(stop_at - 1, 6)
    marker = f"epoch {epoch + 1}/2 step {batch + 1}/6 "
    for line in process.stdout:
        if marker in line:
            process.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "training did not reach the step in time"
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_three_random_steps_then_resume_ends_equal_to_an_uninterrupted_run(tiny_data, tmp_path):
    subprocess.run(train_command(tiny_data, tmp_path / "whole"), cwd=ROOT, check=True, capture_output=True)
    expected, _ = final_weights(tmp_path / "whole")
    kill_steps = sorted(random.Random(2026).sample(range(2, 12), 3))
    resumed = tmp_path / "killed"
    for index, step in enumerate(kill_steps):
        run_until_step(train_command(tiny_data, resumed, *(["--resume", "auto"] if index else [])), step)
    result = subprocess.run(train_command(tiny_data, resumed, "--resume", "auto"), cwd=ROOT, check=True,
                            capture_output=True, text=True)
    assert "resumed from" in result.stdout
    actual, meta = final_weights(resumed)
    assert meta["host_state"]["step"] == 12
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=f"{name} (killed at steps {kill_steps})")


def tiny_state(seed=0):
    config = Config(DEFAULTS)
    ms.set_seed(seed)
    net = build_replknet([5, 3], [1, 1], [8, 16], small_kernel=3, num_classes=4)
    return TrainState(net, create_optimizer(net, config), create_loss_scale(config))


def test_resume_auto_skips_a_truncated_checkpoint_and_ignores_unfinished_saves(tmp_path, caplog):
    state = tiny_state()
    state.step = 5
    save_train_state(state, tmp_path / "good.ckpt")
    time.sleep(0.01)
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "torn.ckpt").write_bytes(data[:len(data) // 2])      # a copy cut off mid-write
    (tmp_path / ".good.tmp-123.ckpt").write_bytes(data[:100])       # an interrupted atomic save
    with caplog.at_level(logging.INFO, logger="replknet_fn"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "good.ckpt"
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("replknet_fn")]
    assert len(messages) == 1 and "skipping torn.ckpt" in messages[0] and "corrupt" in messages[0]
    restored = tiny_state(seed=1)
    restore_train_state(restored, tmp_path / "good.ckpt")
    assert restored.step == 5


def test_a_checkpoint_of_another_model_names_the_first_mismatched_parameter(tmp_path):
    save_train_state(tiny_state(), tmp_path / "small.ckpt")
    config = Config(DEFAULTS)
    other = build_replknet([5, 3], [1, 1], [8, 24], small_kernel=3, num_classes=4)
    state = TrainState(other, create_optimizer(other, config), create_loss_scale(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'stages\.1\.blocks\.0\.prelkb_bn\.moving_mean': "
                                              r"checkpoint has \(16,\), network expects \(24,\)"):
        restore_train_state(state, tmp_path / "small.ckpt")


def make_bad_files(root):
    """Every kind of odd or broken file the issue lists, in train/ and val/ of `root`."""
    train, val = root / "train" / "circle", root / "val" / "circle"
    good = next(train.glob("*.jpg")).read_bytes()
    (train / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (train / "not_an_image.jpg").write_text("this is a text file")
    (val / "truncated.jpg").write_bytes(good[: len(good) // 4])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels[:, :, 0], "L").save(train / "gray.jpg")
    Image.fromarray(pixels).convert("CMYK").save(train / "cmyk.jpg")
    Image.fromarray(np.dstack([pixels, pixels[:, :, :1]]), "RGBA").save(train / "rgba.png")
    Image.fromarray(pixels).convert("P").save(train / "palette.png")
    Image.fromarray(pixels[:1, :1]).save(train / "tiny.png")
    Image.fromarray(pixels[:3, :40]).save(val / "thin.png")
    (root / "train" / "empty_class").mkdir()
    (root / "val" / "empty_class").mkdir()


def test_bad_files_are_skipped_and_counted_and_training_finishes(tiny_data, tmp_path):
    data_dir = tmp_path / "bad"
    shutil.copytree(tiny_data, data_dir)
    make_bad_files(data_dir)
    state, metrics = train_with_func.main(run_args(data_dir, tmp_path / "ckpt", "--num_classes", "9",
                                                   "--epoch_size", "1", "--ema", "False",
                                                   "--num_parallel_workers", "2"))
    assert state.epoch == 1
    log = (tmp_path / "ckpt" / "train.log").read_text()
    assert '"unreadable_images": 3' in log
    # The data workers met them; each is named once, in train.log through the one logging setup.
    for name in ("train/circle/truncated.jpg", "train/circle/not_an_image.jpg", "val/circle/truncated.jpg"):
        assert sum(f"skipping a file that does not decode: cannot decode image file {data_dir / name}" in line
                   for line in log.splitlines()) == 1, name
    assert metrics["num_samples"] == 24 + 1  # the thin val image counts, the truncated one does not


def test_missing_split_is_named(tiny_data, tmp_path):
    shutil.copytree(tiny_data / "train", tmp_path / "only_train" / "train")
    with pytest.raises(DataError, match="val"):
        train_with_func.main(run_args(tmp_path / "only_train", tmp_path / "ckpt"))


def test_class_folders_differing_between_train_and_val_are_named(tiny_data, tmp_path):
    data_dir = tmp_path / "mismatch"
    shutil.copytree(tiny_data, data_dir)
    (data_dir / "val" / "circle").rename(data_dir / "val" / "oval")
    with pytest.raises(DataError, match="circle|oval"):
        train_with_func.main(run_args(data_dir, tmp_path / "ckpt"))


def test_unwritable_checkpoint_directory_is_named_at_start(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*a_file/ckpt is not writable"):
        train_with_func.main(run_args(tiny_data, blocker / "ckpt"))


def test_full_checkpoint_disk_is_named_at_start(tiny_data, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(CheckpointError, match=r"has 0 MiB free but a checkpoint takes"):
        train_with_func.main(run_args(tiny_data, tmp_path / "ckpt"))


def test_unknown_key_and_bad_value_stop_the_script_with_a_message(tiny_data, tmp_path):
    for bad, message in ((["--lr_sheduler", "cosine"], "unknown key 'lr_sheduler'"),
                         (["--re_prob", "2"], "re_prob=2.0 is outside the allowed range [0.0, 1.0]")):
        result = subprocess.run([sys.executable, "train_with_func.py", *bad], cwd=ROOT, capture_output=True,
                                text=True)
        assert result.returncode != 0 and message in result.stderr.splitlines()[-1]
        with pytest.raises(ConfigError):
            train_with_func.main(bad)


def test_pretrained_checkpoint_of_another_size_keeps_a_fresh_classifier(tiny_data, tmp_path):
    train_with_func.main(run_args(tiny_data, tmp_path / "first", "--epoch_size", "1", "--ema", "False"))
    source, _ = read_checkpoint(tmp_path / "first" / "replknet_tiny-last.ckpt")
    data_dir = tmp_path / "more_classes"
    shutil.copytree(tiny_data, data_dir)
    for split in ("train", "val"):
        shutil.copytree(data_dir / split / "circle", data_dir / split / "zz_circle_copy")
    state, _ = train_with_func.main(run_args(data_dir, tmp_path / "second", "--num_classes", "9",
                                             "--epoch_size", "1", "--ema", "False", "--pretrained", "True",
                                             "--ckpt_path", str(tmp_path / "first" / "replknet_tiny-last.ckpt"),
                                             "--max_steps", "1", "--lr", "0"))
    params = dict(state.net.parameters_and_names())
    np.testing.assert_array_equal(params["stem.0.conv.weight"].asnumpy(), source["stem.0.conv.weight"].asnumpy())
    assert tuple(params["head.weight"].shape) == (9, 128)
    assert os.path.exists(tmp_path / "second" / "replknet_tiny-last.ckpt")
