"""Evaluate a checkpoint on data_dir/val: top-1, top-5, loss; the last line is one JSON object.

    python validate_with_func.py --ckpt_path ckpt/demo/replknet_tiny-best.ckpt            # the demo
    python validate_with_func.py --data_dir /data/imagenet --ckpt_path run/best.ckpt [--use_ema] [--reparam]
    python validate_with_func.py --data_dir /data/imagenet --ckpt_path RepLKNet-31B_ImageNet-1K_224.pth \\
        --model replknet31_base                                                     # official weights

The network and its preprocessing (image size, crop_pct, interpolation, mean/std, resize rule) come from the
checkpoint's own record of its training (our checkpoints); official weights use the official values for
`--model` (RepLKNet-XL: mean = std = 0.5; at 384 and above, warped to a square). A flag or `--config` file that
sets one of them wins. Every validation image is counted exactly once, also when sharded over processes.
`--results_file F.json|F.csv` also writes the results there.
"""
import csv
import json
import logging
import sys
from pathlib import Path

from replknet_fn import allocator, kernels

if __name__ == "__main__":
    allocator.restart_with_jemalloc()  # before MindSpore loads: allocator.py says why
    kernels.build_in_background()  # g++ while MindSpore imports (kernels.py)

from replknet_fn import data, device, dist, dwconv
from replknet_fn.checkpoint import CheckpointError
from replknet_fn.config import DEMO_CONFIG, VALIDATE, ConfigError, parse_config_and_given
from replknet_fn.evaluation import evaluate, make_eval_step
from replknet_fn.runlog import setup_logging
from replknet_fn.weights import PREPROCESSING_KEYS, eval_preprocessing, network_from_checkpoint

log = logging.getLogger("replknet_fn.validate")


def main(argv=None):
    config, given = parse_config_and_given(argv, default_config=DEMO_CONFIG,
                                           description=__doc__.splitlines()[0], entry_point=VALIDATE)
    if not config.ckpt_path:
        raise ConfigError("give the checkpoint to evaluate with --ckpt_path")
    config.device_target = device.apply_device_target(config.device_target)
    config.amp_level = device.resolve_amp_level(config.amp_level, config.device_target)
    rank, world_size = dist.init_distributed(config.distribute, config.collective_timeout)
    setup_logging(rank)
    if not config.data_dir:
        from replknet_fn.demo_data import ensure_demo_dataset
        config.data_dir = str(ensure_demo_dataset(config.demo_data_dir))
    val_samples, class_names = data.find_split(config.data_dir, config.val_split)

    net, record = network_from_checkpoint(config.ckpt_path, None if "model" not in given else config.model,
                                          use_ema=config.use_ema, reparam=config.reparam,
                                          large_kernel_impl=config.large_kernel_impl)
    if record.get("class_names") and record["class_names"] != class_names:
        raise ConfigError(f"{config.ckpt_path} was trained on other classes than {config.data_dir}/"
                          f"{config.val_split} has ({len(record['class_names'])} vs {len(class_names)} classes)")
    recorded = eval_preprocessing(record, config.model)
    config.update({key: recorded[key] for key in PREPROCESSING_KEYS if key not in given})
    log.info("%s%s%s: %s at %d px (%s, crop_pct %g, %s), mean %s std %s", config.ckpt_path,
             " (EMA)" if config.use_ema else "", " re-parameterized" if config.reparam else "",
             record.get("model", config.model), config.image_resize, data_resize_rule(config), config.crop_pct,
             config.interpolation, list(config.mean), list(config.std))

    dwconv.decide_for(net, (config.batch_size, 3, config.image_resize, config.image_resize))  # before compiling
    eval_step = make_eval_step(device.mixed_precision(net, config.amp_level), config.jit)
    batches = data.eval_batches(val_samples, config, rank, world_size)
    metrics = evaluate(net, eval_step, batches, dist.make_sum_across_ranks(world_size),
                       num_batches=data.num_eval_batches(len(val_samples), config.batch_size, world_size))
    log.info("top-1 %.3f%%, top-5 %.3f%%, loss %.4f on %d images", metrics["top1"], metrics["top5"],
             metrics["loss"], metrics["num_samples"])
    if config.results_file and rank == 0:
        write_results(config.results_file, results_row(metrics, net, config))
    if rank == 0:
        print(json.dumps(metrics), flush=True)  # the result, on stdout: the last line is this JSON object
    return metrics


def data_resize_rule(config):
    return "warp" if data.warps_at_eval(config) else "resize and centre crop"


def results_row(metrics, net, config):
    """One row of results, with what is needed to reproduce it (timm's --results-file, plus our flags)."""
    return dict(metrics, param_count=sum(param.size for param in net.trainable_params()),
                image_size=config.image_resize, crop_pct=config.crop_pct, interpolation=config.interpolation,
                eval_resize="warp" if data.warps_at_eval(config) else "crop", mean=list(config.mean),
                std=list(config.std), checkpoint=str(config.ckpt_path), use_ema=config.use_ema,
                reparam=config.reparam, model=getattr(net, "name", None) or config.model)


def write_results(path, row):
    """`row` as JSON (.json) or as a CSV header and line (.csv)."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(row, indent=2) + "\n")
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            writer.writeheader()
            writer.writerow({key: " ".join(map(str, value)) if isinstance(value, list) else value
                             for key, value in row.items()})
    else:
        raise ConfigError(f"results_file {path}: name a .json or .csv file")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, data.DataError, dist.DistributedError, device.DeviceError) as error:
        sys.exit(f"error: {error}")
    except RuntimeError as error:
        explanation = dist.explain_failure(error)
        if explanation is None:
            raise
        sys.exit(f"error: {explanation}")
