"""The official workflows from the command line (issue 14): preprocessing from the checkpoint's record, the
official per-model values (XL's mean/std, the warp at >= 384), splits, results files, backbones, and the command
line conventions of every entry point (bare booleans, one name per concept, no flag that is silently ignored)."""
import ast
import csv
import json
import logging
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from replknet_fn import augment, convert, data, erf, export, features, predict, replknet_tiny
from replknet_fn.checkpoint import save_train_state
from replknet_fn.config import DEFAULTS, TRAIN, VALIDATE, Config, ConfigError, flags_of, parse_config, parse_tool_args
from replknet_fn.demo_data import ensure_demo_dataset
from replknet_fn.optim import create_optimizer
from replknet_fn.train_state import TrainState, create_loss_scale
from replknet_fn.weights import eval_preprocessing, network_from_checkpoint

import train_with_func
import validate_with_func
from conftest import ROOT


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 classes of 56 px images: 1 train and 2 val images per class."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train_per_class=1,
                               num_val_per_class=2, image_size=56)


@pytest.fixture(scope="module")
def trained_at_48(shapes, tmp_path_factory):
    """A checkpoint as training writes it, of a run at image_resize 48 with crop_pct 0.8 and bilinear resizing."""
    _, _, class_names = data.find_splits(shapes)
    config = Config(DEFAULTS, model="replknet_tiny", num_classes=8, image_resize=48, crop_pct=0.8,
                    interpolation="bilinear")
    ms.set_seed(0)
    net = replknet_tiny(num_classes=8)
    state = TrainState(net, create_optimizer(net, config), create_loss_scale(config))
    meta = {"model": "replknet_tiny", "build_args": net.build_args, "class_names": class_names,
            "config": {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}}
    path = tmp_path_factory.mktemp("ckpt") / "replknet_tiny-last.ckpt"
    save_train_state(state, path, meta)
    return path


def validate(args, tmp_path, workers="0"):
    """validate_with_func.main with a results file; `workers=None` keeps the default data workers."""
    results = tmp_path / "results.json"
    workers_flag = [] if workers is None else ["--num_parallel_workers", workers]
    metrics = validate_with_func.main([*args, *workers_flag, "--results_file", str(results)])
    return metrics, json.loads(results.read_text())


# ---- preprocessing comes from the checkpoint, or from the official values per model ---------------------------

def test_a_checkpoint_trained_at_48_validates_at_48_without_its_config(shapes, trained_at_48, tmp_path):
    # The user's command as it stands, default data workers included.
    metrics, row = validate(["--data_dir", str(shapes), "--ckpt_path", str(trained_at_48)], tmp_path, workers=None)
    assert (row["image_size"], row["crop_pct"], row["interpolation"]) == (48, 0.8, "bilinear")
    explicit, _ = validate(["--data_dir", str(shapes), "--ckpt_path", str(trained_at_48), "--image_resize", "48",
                            "--crop_pct", "0.8", "--interpolation", "bilinear"], tmp_path)
    assert metrics == explicit and metrics["num_samples"] == 16


def test_a_flag_overrides_the_checkpoints_preprocessing(shapes, trained_at_48, tmp_path):
    _, row = validate(["--data_dir", str(shapes), "--ckpt_path", str(trained_at_48), "--image_resize", "40"],
                      tmp_path)
    assert (row["image_size"], row["crop_pct"]) == (40, 0.8)


def test_official_weights_use_the_official_values_of_their_model():
    assert eval_preprocessing({}, "replknet_xlarge") == dict(image_resize=320, crop_pct=0.875,
                                                            interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                                                            std=(0.5, 0.5, 0.5), eval_resize="auto")
    base = eval_preprocessing({}, "replknet31_base")
    assert base["mean"] == (0.485, 0.456, 0.406) and base["std"] == (0.229, 0.224, 0.225)
    assert base["image_resize"] == 224


def test_xl_normalization_maps_pixels_with_mean_and_std_one_half(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    settings = Config(DEFAULTS, batch_size=1, num_parallel_workers=0,
                      **eval_preprocessing({}, "replknet_xlarge") | {"image_resize": 16, "eval_resize": "warp"})
    images, _, _ = next(data.eval_batches([(str(tmp_path / "x.png"), 0)], settings))
    resized = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BICUBIC), np.float32)
    np.testing.assert_allclose(images[0], ((resized / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


def official_eval_transform(image, input_size, crop_pct=224 / 256):
    """The official datasets.py build_transform(is_train=False) with torchvision's PIL ops written out: at 384
    and above Resize((s, s)) (a warp), below Resize(int(s / crop_pct)) of the shorter side and CenterCrop(s)."""
    if input_size >= 384:
        image = image.resize((input_size, input_size), Image.BICUBIC)
    else:
        size = int(input_size / crop_pct)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if width <= height else (new_long, size), Image.BICUBIC)
        width, height = image.size
        top, left = int(round((height - input_size) / 2.0)), int(round((width - input_size) / 2.0))
        image = image.crop((left, top, left + input_size, top + input_size))
    return augment.normalize(image)


@pytest.mark.parametrize("input_size", [384, 224])
def test_evaluation_at_384_and_above_warps_as_the_official_datasets_py(input_size):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    settings = Config(DEFAULTS, image_resize=input_size)
    ours = augment.eval_transform(image, input_size, settings.crop_pct, "bicubic",
                                  warp=data.warps_at_eval(settings))
    np.testing.assert_array_equal(ours, official_eval_transform(image, input_size))
    assert data.warps_at_eval(settings) == (input_size >= 384)


# ---- splits, results, backbones ------------------------------------------------------------------------------

def test_validation_needs_no_train_split(shapes, trained_at_48, tmp_path):
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    (only_val / "val").symlink_to(Path(shapes) / "val")
    metrics, _ = validate(["--data_dir", str(only_val), "--ckpt_path", str(trained_at_48)], tmp_path)
    assert metrics["num_samples"] == 16


def test_training_without_validation_needs_no_val_split(shapes, tmp_path):
    only_train = tmp_path / "pretrain22k"
    only_train.mkdir()
    (only_train / "images").symlink_to(Path(shapes) / "train")
    train_with_func.main(["--data_dir", str(only_train), "--train_split", "images", "--val_while_train", "False",
                          "--image_resize", "32", "--batch_size", "4", "--epoch_size", "1", "--jit", "False",
                          "--num_parallel_workers", "0", "--tensorboard", "False",
                          "--ckpt_save_dir", str(tmp_path / "ckpt")])
    assert (tmp_path / "ckpt" / "replknet_tiny-last.ckpt").exists()


def test_a_run_that_stops_before_validating_says_so(shapes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="replknet_fn"):
        train_with_func.main(["--data_dir", str(shapes), "--image_resize", "32", "--batch_size", "4",
                              "--max_steps", "1", "--jit", "False", "--num_parallel_workers", "0",
                              "--tensorboard", "False", "--ckpt_save_dir", str(tmp_path)])
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("replknet_fn")]
    assert any("not validated" in message for message in messages)
    assert json.loads(messages[-1])["best_top1"] is None


def test_training_from_ckpt_path_alone_starts_from_those_weights(shapes, trained_at_48, tmp_path):
    state, _ = train_with_func.main(["--data_dir", str(shapes), "--ckpt_path", str(trained_at_48),
                                     "--image_resize", "32", "--batch_size", "4", "--max_steps", "1", "--lr", "0",
                                     "--weight_decay", "0", "--jit", "False", "--num_parallel_workers", "0",
                                     "--tensorboard", "False", "--ckpt_save_dir", str(tmp_path)])
    start, _ = network_from_checkpoint(trained_at_48)
    np.testing.assert_array_equal(state.net.head.weight.asnumpy(), start.head.weight.asnumpy())


def test_results_file_as_csv_names_what_reproduces_the_numbers(shapes, trained_at_48, tmp_path):
    results = tmp_path / "results.csv"
    metrics = validate_with_func.main(["--data_dir", str(shapes), "--ckpt_path", str(trained_at_48),
                                       "--num_parallel_workers", "0", "--reparam", "--results_file", str(results)])
    with open(results) as file:
        (row,) = list(csv.DictReader(file))
    assert float(row["top1"]) == metrics["top1"] and int(row["image_size"]) == 48
    assert row["reparam"] == "True" and row["use_ema"] == "False" and row["checkpoint"] == str(trained_at_48)
    assert int(row["param_count"]) > 0 and row["mean"] == "0.485 0.456 0.406"


def test_features_tool_prints_each_stage_shape_and_stride(trained_at_48, capsys):
    features.main(["--ckpt_path", str(trained_at_48), "--json"])
    assert json.loads(capsys.readouterr().out)["image_size"] == 48  # the checkpoint's
    shapes = features.main(["--ckpt_path", str(trained_at_48), "--image_resize", "64", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [(stage["shape"], stage["stride"]) for stage in printed["stages"]] == [
        ([1, 16, 16, 16], 4), ([1, 32, 8, 8], 8), ([1, 64, 4, 4], 16), ([1, 128, 2, 2], 32)]
    assert len(shapes) == 4


def test_backbone_prefixes_of_official_segmentation_checkpoints_are_accepted(official_state_dict):
    segmentation = {"state_dict": {**{f"backbone.{key}": value for key, value in official_state_dict.items()},
                                   "decode_head.conv_seg.weight": np.zeros((150, 512, 1, 1), np.float32)}}
    unwrapped = convert.unwrap_state_dict(segmentation)
    assert set(unwrapped) == set(convert.unwrap_state_dict(official_state_dict))


# ---- the command line of every entry point -------------------------------------------------------------------

TOOLS = {"predict": predict, "export": export, "erf": erf, "features": features}
TOOL_ARGS = {"predict": ["IMAGE"], "export": [], "erf": ["--data_dir", "d", "--out", "o"], "features": []}


def tool_args(name, *flags):
    parser = TOOLS[name].build_parser()
    return parse_tool_args(parser, ["--ckpt_path", "c.ckpt", *TOOL_ARGS[name], *flags])


@pytest.mark.parametrize("entry_point, flag", [(TRAIN, "ema"), (TRAIN, "distribute"), (VALIDATE, "use_ema"),
                                               (VALIDATE, "reparam"), (VALIDATE, "jit")])
def test_bare_and_valued_booleans_parse_the_same_in_the_entry_scripts(entry_point, flag):
    bare = parse_config([f"--{flag}"], entry_point=entry_point)[flag]
    assert bare is True
    assert parse_config([f"--{flag}", "True"], entry_point=entry_point)[flag] is True
    assert parse_config([f"--{flag}=false"], entry_point=entry_point)[flag] is False
    assert parse_config([f"--{flag}", "--seed", "3"] if entry_point == TRAIN else [f"--{flag}"],
                        entry_point=entry_point)[flag] is True


@pytest.mark.parametrize("tool, flag", [("predict", "use_ema"), ("predict", "reparam"), ("predict", "json"),
                                        ("export", "dynamic_batch"), ("export", "fold_all"), ("export", "use_ema"),
                                        ("features", "json")])
def test_bare_and_valued_booleans_parse_the_same_in_every_tool(tool, flag):
    assert getattr(tool_args(tool, f"--{flag}"), flag) is True
    assert getattr(tool_args(tool, f"--{flag}", "true"), flag) is True
    assert getattr(tool_args(tool, f"--{flag}", "False"), flag) is False
    assert getattr(tool_args(tool), flag) is False


def test_c_is_config_and_old_flag_names_still_work_with_a_note(caplog):
    assert parse_config(["-c", str(ROOT / "configs" / "demo.yaml")]).model == "replknet_tiny"
    with caplog.at_level(logging.WARNING, logger="replknet_fn"):
        args = parse_tool_args(predict.build_parser(), ["--ckpt", "c.ckpt", "--image_size", "96",
                                                        "--num_workers", "0", "IMAGE"])
    assert (args.ckpt_path, args.image_resize, args.num_parallel_workers) == ("c.ckpt", 96, 0)
    assert sum("deprecated" in record.getMessage() for record in caplog.records) == 3


def test_validate_refuses_a_training_flag_it_would_ignore():
    with pytest.raises(ConfigError, match=r"unknown key 'ema' in the command line; did you mean use_ema"):
        parse_config(["--ema", "True"], entry_point=VALIDATE)
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        parse_config(["--lr", "0.1"], entry_point=VALIDATE)


def attributes_read(paths, names=("config", "args", "settings")):
    """Every `X` read as `<name>.X` or `getattr(<name>, "X")` in the files at `paths`."""
    read = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
                read.add(node.attr)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant):
                read.add(node.args[1].value)
    return read


def test_every_flag_of_every_entry_point_is_read():
    """A flag the program never reads would be silently ignored: each entry point's flags must all be read,
    as `config.X` / `args.X` / `settings.X` or a settings field built from the config, in its modules."""
    package = sorted((ROOT / "replknet_fn").glob("*.py"))
    settings_fields = {field for cls in (augment.AugmentSettings, data.TrainSettings, data.EvalSettings)
                       for field in cls.__dataclass_fields__} | set(predict.PredictSettings.__dataclass_fields__)
    read = attributes_read(package + [ROOT / "train_with_func.py", ROOT / "validate_with_func.py"]) | settings_fields
    for entry_point in (TRAIN, VALIDATE):
        unread = sorted(set(flags_of(entry_point)) - read - {"config"})
        assert not unread, f"{entry_point} takes flags it never reads: {unread}"
    for name, module in TOOLS.items():
        flags = {action.dest for action in module.build_parser()._actions if action.dest != "help"}
        unread = sorted(flags - attributes_read([module.__file__]) - settings_fields)
        assert not unread, f"{name} takes flags it never reads: {unread}"


def test_validate_reads_every_flag_it_takes(shapes, trained_at_48, tmp_path, monkeypatch):
    """The dynamic check for validate: run it and record which config keys it reads."""
    read = set()
    original = Config.__getattr__

    def recording(self, key):
        read.add(key)
        return original(self, key)

    monkeypatch.setattr(Config, "__getattr__", recording)
    validate(["--data_dir", str(shapes), "--ckpt_path", str(trained_at_48)], tmp_path)
    # demo_data_dir is read only without a data_dir (the static test above sees it read).
    assert sorted(set(flags_of(VALIDATE)) - read - {"config", "demo_data_dir"}) == []
