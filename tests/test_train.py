"""The hand-written loop end to end on a tiny generated data set: checkpoints, resume, validation."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from replknet_fn.demo_data import ensure_demo_dataset

import train_with_func
import validate_with_func
from conftest import ROOT, final_weights, run_args


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=6,
                               num_val_per_class=3, image_size=32)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("uninterrupted")
    state, metrics = train_with_func.main(run_args(tiny_data, ckpt_dir))
    return ckpt_dir, state, metrics


def test_run_writes_last_best_epoch_checkpoints_config_and_log(uninterrupted):
    ckpt_dir, state, metrics = uninterrupted
    names = {path.name for path in ckpt_dir.iterdir()}
    assert {"replknet_tiny-last.ckpt", "replknet_tiny-best.ckpt", "replknet_tiny-epoch0001.ckpt",
            "replknet_tiny-epoch0002.ckpt", "config.yaml", "train.log"} <= names
    _, meta = final_weights(ckpt_dir)
    assert meta["host_state"]["epoch"] == 2 and meta["host_state"]["step"] == state.step == 12
    assert meta["class_names"][:2] == ["checker", "circle"] and meta["model"] == "replknet_tiny"
    assert metrics["num_samples"] == 24 and 0.0 <= metrics["top1"] <= 100.0 and "ema_top1" in metrics


def test_resume_after_a_stop_mid_epoch_ends_equal_to_the_uninterrupted_run(uninterrupted, tiny_data, tmp_path):
    expected, _ = final_weights(uninterrupted[0])
    train_with_func.main(run_args(tiny_data, tmp_path, "--max_steps", "4"))
    _, meta = final_weights(tmp_path)
    assert meta["host_state"]["step"] == 4 and meta["host_state"]["batch_in_epoch"] == 4
    train_with_func.main(run_args(tiny_data, tmp_path, "--resume", "auto"))
    actual, _ = final_weights(tmp_path)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_validate_reproduces_the_in_loop_validation_exactly(uninterrupted, tiny_data):
    ckpt_dir, _, metrics = uninterrupted
    common = ["--data_dir", str(tiny_data), "--image_resize", "32", "--batch_size", "8",
              "--num_parallel_workers", "0", "--ckpt_path", str(ckpt_dir / "replknet_tiny-last.ckpt")]
    plain = validate_with_func.main(common)
    assert plain == {key: metrics[key] for key in ("top1", "top5", "loss", "num_samples")}
    ema = validate_with_func.main(common + ["--use_ema", "True"])
    assert ema["top1"] == metrics["ema_top1"] and ema["loss"] == metrics["ema_loss"]
    assert ema["loss"] != plain["loss"]  # the EMA weights really were swapped in
    reparam = validate_with_func.main(common + ["--reparam", "True"])
    assert reparam["top1"] == plain["top1"] and reparam["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_validate_cli_prints_one_json_line_last(uninterrupted, tiny_data):
    ckpt_dir, _, metrics = uninterrupted
    result = subprocess.run([sys.executable, "validate_with_func.py", "--data_dir", str(tiny_data),
                             "--image_resize", "32", "--batch_size", "8", "--num_parallel_workers", "0",
                             "--ckpt_path", str(ckpt_dir / "replknet_tiny-best.ckpt")],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last) == {"top1", "top5", "loss", "num_samples"} and last["num_samples"] == 24


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    train_with_func.main(run_args(tiny_data, tmp_path, "--epoch_size", "1", "--ema", "False"))
    good, _ = final_weights(tmp_path)
    with pytest.raises(train_with_func.TrainingDiverged, match="3 consecutive steps had non-finite"):
        # lr 1e30 blows the weights up after one step; every later step is non-finite and skipped.
        train_with_func.main(run_args(tiny_data, tmp_path, "--epoch_size", "2", "--ema", "False", "--resume",
                                      "auto", "--lr", "1e30", "--clip_grad", "False", "--warmup_epochs", "0",
                                      "--scheduler", "constant", "--max_consecutive_skips", "3"))
    kept, _ = final_weights(tmp_path)
    for name, value in good.items():
        np.testing.assert_array_equal(kept[name], value, err_msg=name)


class RecordingTensorBoard:
    def __init__(self):
        self.scalar_values = {}

    def scalars(self, step, **values):
        self.scalar_values.update(values)


def progress_line(losses_and_finite, caplog, timed=True):
    from types import SimpleNamespace
    state = SimpleNamespace(epoch=0, batch_in_epoch=0, step=0)
    window = train_with_func.ProgressWindow(state, total_steps=10)
    for loss, finite in losses_and_finite:
        state.step += 1
        state.batch_in_epoch += 1
        window.add(state, loss, finite, timed)
    tensorboard = RecordingTensorBoard()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="replknet_fn"):
        train_with_func.log_progress(tensorboard, window, state,
                                     SimpleNamespace(epoch_size=1, batch_size=4, accumulation_steps=1), 10, 1,
                                     0.1, float("inf"), 2.0)
    return caplog.records[-1].getMessage(), tensorboard.scalar_values


def test_progress_line_means_the_loss_of_finite_steps_only(caplog):
    line, scalars = progress_line([(2.0, True), (0.0, False), (4.0, True)], caplog)
    assert " loss 3.0000 " in line and scalars["train/loss"] == 3.0


def test_progress_line_of_only_skipped_steps_shows_no_loss(caplog):
    line, scalars = progress_line([(0.0, False), (0.0, False)], caplog)
    assert " loss - (2 skipped) " in line and "train/loss" not in scalars
    assert "train/grad_norm" not in scalars  # inf: tensorboardX would refuse it


def test_progress_line_after_only_the_compiling_step_gives_no_speed(caplog):
    line, scalars = progress_line([(2.0, True)], caplog, timed=False)
    assert " loss 2.0000 " in line and "img/s ETA" not in line and "train/images_per_second" not in scalars
    line, scalars = progress_line([(2.0, True)], caplog)
    assert "img/s ETA" in line and scalars["train/images_per_second"] > 0
