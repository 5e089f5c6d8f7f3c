"""Official checkpoints load exactly, in every wrapping the official code produces, or fail naming the key."""
import json
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from replknet_fn import replknet31_base, replknet_tiny
from replknet_fn.convert import ConversionError, load_official_state_dict, net_parameters, read_torch_zip
from replknet_fn.reparam import reparameterize

from conftest import REFERENCE, ROOT, relative_error


def synthesized_31b_state_dict(shapes_file):
    shapes = json.loads((REFERENCE / shapes_file).read_text())
    rng = np.random.default_rng(0)
    return {key: (np.array(0, np.int64) if key.endswith("num_batches_tracked")
                  else rng.standard_normal(shape).astype(np.float32))
            for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def net_31b():
    return replknet31_base()


@pytest.fixture(scope="module")
def state_dict_31b():
    return synthesized_31b_state_dict("replknet31b_torch_state_dict_shapes.json")


def test_every_official_31b_key_loads(net_31b, state_dict_31b):
    loaded = load_official_state_dict(net_31b, state_dict_31b)
    assert len(loaded) == len(state_dict_31b) - sum(k.endswith("num_batches_tracked") for k in state_dict_31b)
    assert len(loaded) == len(net_parameters(net_31b))
    params = dict(net_31b.parameters_and_names())
    np.testing.assert_array_equal(params["stages.2.blocks.6.large_kernel.lkb_origin.bn.moving_variance"].asnumpy(),
                                  state_dict_31b["stages.2.blocks.6.large_kernel.lkb_origin.bn.running_var"])
    np.testing.assert_array_equal(params["head.weight"].asnumpy(), state_dict_31b["head.weight"])


def test_official_deploy_form_31b_keys_load_into_reparameterized_net():
    state_dict = synthesized_31b_state_dict("replknet31b_torch_reparam_state_dict_shapes.json")
    deploy_31b = reparameterize(replknet31_base())
    assert len(load_official_state_dict(deploy_31b, state_dict)) == len(net_parameters(deploy_31b))


def test_wrong_shape_is_named_with_both_shapes(net_31b, state_dict_31b):
    bad = dict(state_dict_31b)
    bad["stages.1.blocks.0.pw1.conv.weight"] = np.zeros((256, 128, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"stages\.1\.blocks\.0\.pw1\.conv\.weight.*\(256, 128, 1, 1\).*"
                                              r"\(256, 256, 1, 1\)"):
        load_official_state_dict(net_31b, bad)


def test_missing_key_is_named(net_31b, state_dict_31b):
    bad = dict(state_dict_31b)
    del bad["stages.3.blocks.1.pw2.bn.running_mean"]
    with pytest.raises(ConversionError, match=r"missing key 'stages\.3\.blocks\.1\.pw2\.bn\.running_mean'"):
        load_official_state_dict(net_31b, bad)


def test_training_form_into_deploy_net_is_refused(state_dict_31b):
    with pytest.raises(ConversionError, match="training .*form"):
        load_official_state_dict(reparameterize(replknet_tiny()), {"stages.0.blocks.0.large_kernel.lkb_origin."
                                                                   "conv.weight": np.zeros(1)})


@pytest.mark.parametrize("wrap", ["flat", "model", "model_ema", "state_dict", "module_prefix", "cls_22k"])
def test_wrapped_state_dicts_load(official_state_dict, fixture, wrap):
    state_dict = dict(official_state_dict)
    if wrap == "module_prefix":
        state_dict = {"module." + key: value for key, value in state_dict.items()}
    elif wrap == "cls_22k":
        state_dict = {key.replace("head.", "head.cls_22k."): value for key, value in state_dict.items()}
    elif wrap != "flat":
        state_dict = {wrap: state_dict, "epoch": 3}
    net = replknet_tiny()
    load_official_state_dict(net, state_dict)
    net.set_train(False)
    assert relative_error(net(ms.Tensor(fixture["input"])).asnumpy(), fixture["logits_eval"]) < 1e-5


def test_classifier_of_another_size_is_kept_only_when_allowed(official_state_dict):
    net = replknet_tiny(num_classes=7)
    with pytest.raises(ConversionError, match=r"head\.weight"):
        load_official_state_dict(net, official_state_dict)
    loaded = load_official_state_dict(net, official_state_dict, allow_head_mismatch=True)
    assert "head.weight" not in loaded and "stem.0.conv.weight" in loaded


def test_pth_zip_reads_without_torch(tmp_path):
    """tests/data/tiny_official.pth was written by torch.save (see tests/data/README.md)."""
    data = read_torch_zip(ROOT / "tests" / "data" / "tiny_official.pth")
    expected = np.load(ROOT / "tests" / "data" / "tiny_official_expected.npz")
    state = data["model"]
    for key in expected.files:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
    assert data["epoch"] == 7


def test_convert_cli_writes_a_checkpoint_that_reproduces_official_logits(tmp_path, official_state_dict, fixture):
    src = tmp_path / "official.npz"
    np.savez(src, **official_state_dict)
    dst = tmp_path / "converted.ckpt"
    subprocess.run([sys.executable, "-m", "replknet_fn.convert", str(src), str(dst), "--model", "replknet_tiny"],
                   check=True, cwd=ROOT, capture_output=True)
    net = replknet_tiny()
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(str(dst)))
    assert not not_loaded
    net.set_train(False)
    assert relative_error(net(ms.Tensor(fixture["input"])).asnumpy(), fixture["logits_eval"]) < 1e-5


def test_convert_cli_names_the_bad_key(tmp_path, official_state_dict):
    bad = dict(official_state_dict)
    bad["stem.0.conv.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    src = tmp_path / "bad.npz"
    np.savez(src, **bad)
    result = subprocess.run([sys.executable, "-m", "replknet_fn.convert", str(src), str(tmp_path / "x.ckpt"),
                             "--model", "replknet_tiny"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "stem.0.conv.weight" in result.stderr and "(16, 3, 5, 5)" in result.stderr
    assert not (tmp_path / "x.ckpt").exists()
