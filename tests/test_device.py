"""The device: device_target is applied, the compiled CPU kernels run only on the CPU, amp_level auto follows the
device. No accelerator is present here, so the tests report the device as Ascend (or GPU) by replacing
`device.current_target` and `device.build_device` and skipping MindSpore's set_device: MindSpore then still
computes on the CPU, and the tests see which ops the network, the step and the optimizer call."""
import pytest
import yaml
from mindspore import ops

from replknet_fn import device
from replknet_fn.config import ConfigError, parse_config
from replknet_fn.demo_data import ensure_demo_dataset

import train_with_func
from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=2,
                               num_val_per_class=1, image_size=32)


@pytest.fixture
def custom_op_calls(monkeypatch):
    """Names of the compiled kernels called (eager execution calls each op's __call__)."""
    calls = []
    original = ops.Custom.__call__

    def counting(self, *args):
        calls.append(str(self.func).rsplit(":", 1)[-1])
        return original(self, *args)

    monkeypatch.setattr(ops.Custom, "__call__", counting)
    return calls


def report_device_as(monkeypatch, target):
    monkeypatch.setattr(device, "current_target", lambda: target)
    monkeypatch.setattr(device, "build_device", lambda: target)
    monkeypatch.setattr(device, "set_device", lambda _: None)


def train_the_recipe_config(tiny_data, ckpt_dir):
    """The README's recipe command with `--amp_level auto`, shrunk to one eager step of the tiny model."""
    return train_with_func.main([
        "--config", str(ROOT / "configs" / "replknet31_base.yaml"), "--data_dir", str(tiny_data),
        "--amp_level", "auto", "--model", "replknet_tiny", "--num_classes", "8", "--image_resize", "32",
        "--batch_size", "4", "--max_steps", "1", "--epoch_size", "1", "--jit", "False",
        "--num_parallel_workers", "0", "--val_while_train", "False", "--tensorboard", "False",
        "--distribute", "False", "--ckpt_save_dir", str(ckpt_dir)])


def resolved_config(ckpt_dir):
    return yaml.safe_load((ckpt_dir / "config.yaml").read_text())


def test_on_cpu_the_recipe_config_trains_in_fp32_with_the_compiled_kernels(tiny_data, tmp_path, custom_op_calls):
    train_the_recipe_config(tiny_data, tmp_path)
    config = resolved_config(tmp_path)
    assert (config["device_target"], config["amp_level"]) == ("CPU", "O0")
    assert {"dwconv_forward", "dwconv_input_grad", "dwconv_weight_grad", "batch_norm_relu_forward",
            "batch_norm_gelu_forward", "batch_norm_gelu_backward", "squared_sum",
            "adamw_update"} <= set(custom_op_calls)


@pytest.mark.parametrize("target", ["Ascend", "GPU"])
def test_on_an_accelerator_the_recipe_config_runs_amp_o2_and_no_compiled_kernel(target, tiny_data, tmp_path,
                                                                              monkeypatch, custom_op_calls):
    report_device_as(monkeypatch, target)
    train_the_recipe_config(tiny_data, tmp_path)
    config = resolved_config(tmp_path)
    assert (config["device_target"], config["amp_level"]) == (target, "O2")
    assert custom_op_calls == []


def test_an_explicit_amp_level_wins_over_auto():
    assert device.resolve_amp_level("O0", "Ascend") == "O0"
    assert device.resolve_amp_level("O3", "CPU") == "O3"


def test_auto_is_the_device_of_the_installed_build():
    assert device.apply_device_target("auto") == device.build_device() == "CPU"


def test_a_device_this_build_cannot_run_is_an_error_naming_the_build():
    with pytest.raises(device.DeviceError, match=r"device_target GPU: this MindSpore .* build runs on CPU only"):
        device.apply_device_target("GPU")


def test_an_unknown_device_target_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"device_target='TPU' is not one of \['auto', 'CPU', 'GPU', 'Ascend'\]"):
        parse_config(["--device_target", "TPU"])
    with pytest.raises(device.DeviceError, match="choose auto or one of"):
        device.apply_device_target("TPU")
