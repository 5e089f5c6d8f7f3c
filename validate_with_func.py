"""Evaluate a checkpoint on data_dir/val: top-1, top-5, loss; the last line is one JSON object.

    python validate_with_func.py --ckpt_path ckpt/demo/replknet_tiny-best.ckpt            # the demo
    python validate_with_func.py --config configs/replknet31_base.yaml --data_dir /data/imagenet \\
        --ckpt_path replknet31b.ckpt [--use_ema True] [--reparam True]

Takes the same config keys as training. The network is rebuilt from the checkpoint's own record of its
architecture when it has one (our checkpoints), else from `model` and `num_classes` (converted official
weights). Every validation image is counted exactly once, also when sharded over processes.
"""
import json
import sys

from replknet_fn import data, dist, dwconv
from replknet_fn.checkpoint import CheckpointError, load_weights, read_checkpoint
from replknet_fn.config import ConfigError, parse_config
from replknet_fn.evaluation import evaluate, make_eval_step
from replknet_fn.model import build_replknet, create_model
from replknet_fn.reparam import reparameterize
from train_with_func import DEMO_CONFIG, forward_network


def build_network(config, meta):
    if meta.get("build_args"):
        build_args = dict(meta["build_args"], large_kernel_impl=config.large_kernel_impl, recompute=False)
        return build_replknet(**build_args)
    return create_model(config.model, num_classes=config.num_classes, large_kernel_impl=config.large_kernel_impl)


def main(argv=None):
    config = parse_config(argv, default_config=DEMO_CONFIG, description=__doc__.splitlines()[0])
    if not config.ckpt_path:
        raise ConfigError("give the checkpoint to evaluate with --ckpt_path")
    rank, world_size = dist.init_distributed(config.distribute, config.collective_timeout)
    log = print if rank == 0 else (lambda *args: None)
    if not config.data_dir:
        from replknet_fn.demo_data import ensure_demo_dataset
        config.data_dir = str(ensure_demo_dataset(config.demo_data_dir))
    _, val_samples, class_names = data.find_splits(config.data_dir)
    _, meta = read_checkpoint(config.ckpt_path)
    if meta.get("class_names") and meta["class_names"] != class_names:
        raise ConfigError(f"{config.ckpt_path} was trained on other classes than {config.data_dir}/val has "
                          f"({len(meta['class_names'])} vs {len(class_names)} classes)")
    net = build_network(config, meta)
    load_weights(net, config.ckpt_path, use_ema=config.use_ema)
    if config.reparam:
        net = reparameterize(net)
    net.set_train(False)
    dwconv.decide_for(net, (config.batch_size, 3, config.image_resize, config.image_resize))  # before compiling
    eval_step = make_eval_step(forward_network(net, config.amp_level), config.jit)
    batches = data.eval_batches(val_samples, config, rank, world_size)
    metrics = evaluate(net, eval_step, batches, dist.make_sum_across_ranks(world_size), log=log,
                       num_batches=data.num_eval_batches(len(val_samples), config.batch_size, world_size))
    log(f"{config.ckpt_path}{' (EMA)' if config.use_ema else ''}{' re-parameterized' if config.reparam else ''}: "
        f"top-1 {metrics['top1']:.3f}%, top-5 {metrics['top5']:.3f}%, loss {metrics['loss']:.4f} "
        f"on {metrics['num_samples']} images")
    log(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, data.DataError, dist.DistributedError) as error:
        sys.exit(f"error: {error}")
    except RuntimeError as error:
        explanation = dist.explain_failure(error)
        if explanation is None:
            raise
        sys.exit(f"error: {explanation}")
