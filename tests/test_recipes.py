"""Each official-recipe config holds the official RepLKNet-pytorch command's values, key by key.

The commands are copied verbatim from the official README ("Training"; DingXiaoH/RepLKNet-pytorch). A flag a
command does not give takes main.py's argparse default (MAIN_PY_DEFAULTS), and what main.py leaves to timm takes
timm's `create_transform` default. `our_config` translates the result to our keys; a value changed in a YAML file
fails here with the key, our value and the official one.
"""
import re

import pytest

from replknet_fn.config import parse_config

from conftest import ROOT

CONFIGS = ROOT / "configs"

# main.py's argparse defaults (official main.py, get_args_parser) for every flag that shapes a recipe.
MAIN_PY_DEFAULTS = {
    "--batch_size": 64, "--epochs": 300, "--update_freq": 1, "--model": "RepLKNet-31B", "--drop_path": 0.0,
    "--input_size": 224, "--model_ema": False, "--model_ema_decay": 0.9999, "--model_ema_eval": False,
    "--opt": "adamw", "--opt_eps": 1e-8, "--opt_betas": None, "--clip_grad": None, "--weight_decay": 0.05,
    "--lr": 4e-3, "--layer_decay": 1.0, "--min_lr": 1e-6, "--warmup_epochs": 20, "--color_jitter": 0.4,
    "--aa": "rand-m9-mstd0.5-inc1", "--smoothing": 0.1, "--train_interpolation": "bicubic", "--crop_pct": None,
    "--reprob": 0.25, "--mixup": 0.8, "--cutmix": 1.0, "--mixup_prob": 1.0, "--mixup_switch_prob": 0.5,
    "--finetune": "", "--nb_classes": 1000, "--imagenet_default_mean_and_std": True, "--data_set": "IMNET",
    "--disable_eval": False, "--seed": 0, "--num_workers": 10,
}
# Flags of the launcher or of the machine, not of the recipe.
LAUNCH_FLAGS = {"--nproc_per_node", "--nodes", "--ngpus", "--data_path", "--output_dir", "--job_dir", "--eval",
                "--resume"}
MODELS = {"RepLKNet-31B": "replknet31_base", "RepLKNet-31L": "replknet31_large", "RepLKNet-XL": "replknet_xlarge"}
IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm IMAGENET_INCEPTION_MEAN / _STD


def official_flags(command):
    """The flags of an official command line, typed like main.py's defaults, over those defaults."""
    flags = dict(MAIN_PY_DEFAULTS)
    for flag, value in re.findall(r"(--\w+)[ =](\S+)", command):
        if flag in LAUNCH_FLAGS:
            continue
        default = MAIN_PY_DEFAULTS[flag]  # a KeyError names a flag this table does not know yet
        if isinstance(default, bool):
            value = value.lower() in ("yes", "true", "t", "y", "1")  # main.py's str2bool
        elif isinstance(default, (int, float)):
            value = type(default)(value)
        flags[flag] = value
    return flags


def our_config(command):
    """The official command in our keys (README, "Official workflows")."""
    f = official_flags(command)
    mean, std = IMAGENET_DEFAULT if f["--imagenet_default_mean_and_std"] else IMAGENET_INCEPTION
    expected = dict(
        model=MODELS[f["--model"]], num_classes=f["--nb_classes"], drop_path_rate=f["--drop_path"],
        batch_size=f["--batch_size"], accumulation_steps=f["--update_freq"], image_resize=f["--input_size"],
        # timm create_transform's defaults: main.py passes no scale, ratio or hflip
        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation=f["--train_interpolation"],
        auto_augment=f["--aa"].replace("rand-", "randaug-", 1), color_jitter=f["--color_jitter"],
        re_prob=f["--reprob"], mixup=f["--mixup"], cutmix=f["--cutmix"], cutmix_prob=f["--mixup_prob"],
        mixup_switch_prob=f["--mixup_switch_prob"], label_smoothing=f["--smoothing"], mean=mean, std=std,
        # datasets.py: warp at >= 384, else resize to input_size / crop_pct (None: 224 / 256) and centre crop
        eval_resize="auto", crop_pct=f["--crop_pct"] or 224 / 256,
        pretrained=bool(f["--finetune"]), ckpt_path=f["--finetune"],
        ema=f["--model_ema"] and f["--model_ema_eval"], ema_decay=f["--model_ema_decay"],
        opt=f["--opt"], lr=f["--lr"], min_lr=f["--min_lr"], weight_decay=f["--weight_decay"],
        filter_bias_and_bn=True, betas=tuple(f["--opt_betas"] or (0.9, 0.999)), eps=f["--opt_eps"],
        layer_decay=f["--layer_decay"], clip_grad=f["--clip_grad"] is not None,
        # utils.cosine_scheduler: per step, linear warmup from 0, cosine over the epochs after the warmup
        scheduler="cosine_decay", epoch_size=f["--epochs"], warmup_epochs=f["--warmup_epochs"],
        warmup_factor=0.0, decay_epochs=f["--epochs"] - f["--warmup_epochs"], lr_epoch_stair=False,
        val_while_train=not f["--disable_eval"], val_interval=1,  # main.py validates after every epoch
        seed=f["--seed"], num_parallel_workers=f["--num_workers"],
    )
    if f["--data_set"] == "image_folder":  # datasets.py trains on --data_path itself: class folders directly in it
        expected["train_split"] = "."
    return expected


def load(name):
    return parse_config(["--config", str(CONFIGS / f"{name}.yaml")])


def differences(config, expected):
    return {key: {"ours": config[key], "official": value} for key, value in expected.items() if config[key] != value}


# The official README's training commands, verbatim.
OFFICIAL_COMMANDS = {
    "replknet31_base_1k_pretrain_official":
        "python -m torch.distributed.launch --nproc_per_node=8 main.py --model RepLKNet-31B --drop_path 0.5 "
        "--batch_size 64 --lr 4e-3 --update_freq 4 --model_ema true --model_ema_eval true "
        "--data_path /path/to/imagenet-1k --warmup_epochs 10 --epochs 300 --output_dir your_training_dir",
    "replknet31_base_384_finetune":
        "python run_with_submitit.py --nodes 4 --ngpus 8 --model RepLKNet-31B --drop_path 0.8 --input_size 384 "
        "--batch_size 32 --lr 4e-4 --epochs 30 --weight_decay 1e-8 --update_freq 1 --cutmix 0 --mixup 0 "
        "--finetune RepLKNet-31B_ImageNet-1K_224.pth --model_ema true --model_ema_eval true "
        "--data_path /path/to/imagenet-1k --warmup_epochs 1 --job_dir your_training_dir --layer_decay 0.7",
    "replknet31_base_22k_pretrain":
        "python run_with_submitit.py --nodes 16 --ngpus 8 --model RepLKNet-31B --drop_path 0.1 --batch_size 32 "
        "--lr 4e-3 --update_freq 1 --warmup_epochs 5 --epochs 90 --data_set image_folder --nb_classes 21841 "
        "--disable_eval true --data_path /path/to/imagenet-22k --job_dir /path/to/save_results",
    "replknet31_large_22k_pretrain":
        "python run_with_submitit.py --nodes 16 --ngpus 8 --model RepLKNet-31L --drop_path 0.1 --batch_size 32 "
        "--lr 4e-3 --update_freq 1 --warmup_epochs 5 --epochs 90 --data_set image_folder --nb_classes 21841 "
        "--disable_eval true --data_path /path/to/imagenet-22k --job_dir /path/to/save_results",
    "replknet31_base_22k_to_1k_224":
        "python run_with_submitit.py --nodes 2 --ngpus 8 --model RepLKNet-31B --drop_path 0.2 --input_size 224 "
        "--batch_size 32 --lr 4e-4 --epochs 30 --weight_decay 1e-8 --update_freq 1 --cutmix 0 --mixup 0 "
        "--finetune RepLKNet-31B_ImageNet-22K.pth --model_ema true --model_ema_eval true "
        "--data_path /path/to/imagenet-1k --warmup_epochs 1 --job_dir your_training_dir --layer_decay 0.7",
    "replknet31_base_22k_to_1k_384":
        "python run_with_submitit.py --nodes 4 --ngpus 8 --model RepLKNet-31B --drop_path 0.3 --input_size 384 "
        "--batch_size 16 --lr 4e-4 --epochs 30 --weight_decay 1e-8 --update_freq 1 --cutmix 0 --mixup 0 "
        "--finetune RepLKNet-31B_ImageNet-22K.pth --model_ema true --model_ema_eval true "
        "--data_path /path/to/imagenet-1k --warmup_epochs 1 --job_dir your_training_dir --layer_decay 0.7 "
        "--min_lr 3e-4",
    "replknet31_large_22k_to_1k_384":
        "python run_with_submitit.py --nodes 4 --ngpus 8 --model RepLKNet-31L --drop_path 0.3 --input_size 384 "
        "--batch_size 16 --lr 4e-4 --epochs 30 --weight_decay 1e-8 --update_freq 1 --cutmix 0 --mixup 0 "
        "--finetune RepLKNet-31L_ImageNet-22K.pth --model_ema true --model_ema_eval true "
        "--data_path /path/to/imagenet-1k --warmup_epochs 1 --job_dir your_training_dir --layer_decay 0.7 "
        "--min_lr 3e-4",
}
# The README's evaluation command for XL, the only official command for the XL 320 config.
XL_EVAL_COMMAND = ("python -m torch.distributed.launch --nproc_per_node=8 main.py --model RepLKNet-XL --batch_size 32 "
                   "--eval true --resume RepLKNet-XL_MegData73M_ImageNet1K.pth --imagenet_default_mean_and_std false "
                   "--input_size 320")


@pytest.mark.parametrize("name", OFFICIAL_COMMANDS)
def test_recipe_holds_the_official_command(name):
    assert differences(load(name), our_config(OFFICIAL_COMMANDS[name])) == {}


def header_text(name):
    """The leading comment of a config, joined into one line (shell continuations removed)."""
    lines = []
    for line in (CONFIGS / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip().rstrip("\\"))
    return " ".join(" ".join(lines).split())


@pytest.mark.parametrize("name, command", [*OFFICIAL_COMMANDS.items(),
                                           ("replknet_xlarge_320_finetune", XL_EVAL_COMMAND)])
def test_header_quotes_the_official_command(name, command):
    assert " ".join(command.split()) in header_text(name)


@pytest.mark.parametrize("name", [*OFFICIAL_COMMANDS, "replknet_xlarge_320_finetune"])
def test_recipes_run_data_parallel_with_automatic_precision(name):
    config = load(name)
    assert (config.distribute, config.amp_level, config.data_dir) == (True, "auto", "")
    assert config.ckpt_save_dir == f"./ckpt/{name}"


# What the README says about the XL fine-tune: the evaluation command's model, input size, mean/std and resize
# ("Evaluation"), and that it was fine-tuned from the MegData-73M pre-training ("Tips" 1).
XL_OFFICIAL_KEYS = ("model", "num_classes", "image_resize", "mean", "std", "eval_resize", "crop_pct")
OUR_SETTINGS = ("distribute", "amp_level", "data_dir", "ckpt_save_dir")  # not recipe values


def test_xl_320_finetune_holds_the_official_facts():
    config = load("replknet_xlarge_320_finetune")
    expected = {key: value for key, value in our_config(XL_EVAL_COMMAND).items() if key in XL_OFFICIAL_KEYS}
    expected["pretrained"] = True
    assert differences(config, expected) == {}
    assert config.eval_resize == "auto" and config.image_resize < 384  # datasets.py: a centre crop, not a warp


def test_xl_320_finetune_marks_every_value_not_from_the_official_readme():
    official = set(XL_OFFICIAL_KEYS) | {"pretrained"} | set(OUR_SETTINGS)
    unmarked = [line for line in (CONFIGS / "replknet_xlarge_320_finetune.yaml").read_text().splitlines()
                if re.match(r"\w+:", line) and line.split(":")[0] not in official
                and "# not in the official README" not in line]
    assert unmarked == []
