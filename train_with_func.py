"""Train RepLKNet: config -> data -> model -> optimizer and schedule -> train step -> epoch loop -> checkpoints.

    python train_with_func.py                                   # the built-in demo (configs/demo.yaml)
    python train_with_func.py --config configs/replknet31_base.yaml --data_dir /data/imagenet
    msrun --worker_num=8 --local_worker_num=8 train_with_func.py --config ... --distribute True

Every key of the config is also a flag (`--lr 1e-3`); see `python train_with_func.py --help`. To debug the step
in a debugger, run with `--jit False`: the identical step runs eagerly.
"""
import json
import logging
import math
import sys
import time
from pathlib import Path

from replknet_fn import allocator, kernels

if __name__ == "__main__":
    allocator.restart_with_jemalloc()  # before MindSpore loads: allocator.py says why
    kernels.build_in_background()  # g++ while MindSpore imports (kernels.py)

import mindspore as ms

from replknet_fn import compile_cache, data, device, dist, dwconv
from replknet_fn.checkpoint import (
    CheckpointError,
    check_free_space,
    check_writable,
    find_resume_checkpoint,
    link_or_copy,
    restore_train_state,
    save_train_state,
    select_kept,
)
from replknet_fn.config import DEMO_CONFIG, Config, ConfigError, parse_config, save_config
from replknet_fn.evaluation import evaluate, make_eval_step
from replknet_fn.model import create_model, set_drop_path_seed
from replknet_fn.optim import create_optimizer
from replknet_fn.parameters import write_parameter
from replknet_fn.runlog import Progress, TensorBoard, close_logging, format_duration, setup_logging
from replknet_fn.schedule import create_lr_schedule
from replknet_fn.step import make_train_step
from replknet_fn.train_state import EMA, TrainState, create_loss_scale
from replknet_fn.weights import load_pretrained

log = logging.getLogger("replknet_fn.train")


class TrainingDiverged(RuntimeError):
    pass


def load_data(config):
    if not config.data_dir:
        from replknet_fn.demo_data import ensure_demo_dataset
        config.data_dir = str(ensure_demo_dataset(config.demo_data_dir))
        log.info("no data_dir given: using the built-in demo data set in %s", config.data_dir)
    # Without validation, no validation split is needed (e.g. ImageNet-22K pretraining).
    val_split = config.val_split if config.val_while_train else None
    train_samples, val_samples, class_names = data.find_splits(config.data_dir, config.train_split, val_split)
    if len(class_names) != config.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but {config.data_dir}/{config.train_split} has "
                          f"{len(class_names)} class folders; set --num_classes to match")
    if config.scan_data:
        log.info("scanning %d images...", len(train_samples) + len(val_samples))
        bad = data.scan_images(train_samples + val_samples, config.num_parallel_workers)
        for path, error in bad:
            log.info("  unreadable: %s: %s", path, error)
        log.info("scan: %d unreadable image(s); they will be skipped", len(bad))
    return train_samples, val_samples, class_names


def build_train_state(config, num_classes):
    net = create_model(config.model, num_classes=num_classes, drop_path_rate=config.drop_path_rate,
                       large_kernel_impl=config.large_kernel_impl, recompute=config.recompute)
    if config.pretrained or config.ckpt_path:  # mindcv's convention: --ckpt_path alone starts from those weights
        load_pretrained(net, config.ckpt_path)
    optimizer = create_optimizer(net, config)
    ema = EMA(net, config.ema_decay) if config.ema else None
    return TrainState(net, optimizer, create_loss_scale(config), ema)


def resume(state, config):
    path = config.resume
    if path == "auto":
        path = find_resume_checkpoint(config.ckpt_save_dir)
        if path is None:
            log.info("resume auto: no valid checkpoint in %s; starting from scratch", config.ckpt_save_dir)
            return
    restore_train_state(state, path)
    log.info("resumed from %s: epoch %d, batch %d, step %d", path, state.epoch, state.batch_in_epoch, state.step)


def swap_in_ema(state):
    """Exchange the network weights and the EMA weights (call again to swap back)."""
    for average, source in zip(state.ema.averages, state.ema.sources):
        current = source.asnumpy().copy()  # asnumpy() may alias the buffer that copy_ overwrites next
        write_parameter(source, average.asnumpy().copy())
        write_parameter(average, current)


def validate(state, eval_step, val_samples, config, rank, world_size, sum_across_ranks, stats=None):
    batches = data.eval_batches(val_samples, config, rank, world_size, stats=stats)
    metrics = evaluate(state.net, eval_step, batches, sum_across_ranks,
                       num_batches=data.num_eval_batches(len(val_samples), config.batch_size, world_size))
    if state.ema is not None:
        swap_in_ema(state)
        batches = data.eval_batches(val_samples, config, rank, world_size)
        ema_metrics = evaluate(state.net, eval_step, batches, sum_across_ranks)
        swap_in_ema(state)
        metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
    return metrics


def save_epoch_checkpoints(state, config, meta, metrics):
    """last (always), the epoch checkpoint under the keep policy, best by validation top-1, and with EMA the
    best by EMA top-1 (the official scripts' checkpoint-best-ema)."""
    directory = Path(config.ckpt_save_dir)
    last = directory / f"{config.model}-last.ckpt"
    top1 = metrics.get("top1", -1.0) if metrics else -1.0
    improved = metrics is not None and top1 > state.best_top1
    if improved:
        state.best_top1, state.best_epoch = top1, state.epoch
    ema_improved = metrics is not None and "ema_top1" in metrics and metrics["ema_top1"] > state.best_ema_top1
    if ema_improved:
        state.best_ema_top1, state.best_ema_epoch = metrics["ema_top1"], state.epoch
    epoch_name = f"{config.model}-epoch{state.epoch:04d}.ckpt"
    kept, removed = select_kept(state.kept_checkpoints + [(top1, state.epoch, epoch_name)],
                                config.ckpt_save_policy, config.keep_checkpoint_max)
    state.kept_checkpoints = [list(item) for item in kept]
    save_train_state(state, last, meta)
    if any(item[2] == epoch_name for item in kept):
        link_or_copy(last, directory / epoch_name)
    for _, _, name in removed:
        (directory / name).unlink(missing_ok=True)
    if improved:
        link_or_copy(last, directory / f"{config.model}-best.ckpt")
        log.info("new best top-1 %.2f%% at epoch %d", top1, state.epoch)
    if ema_improved:
        link_or_copy(last, directory / f"{config.model}-best-ema.ckpt")
        log.info("new best EMA top-1 %.2f%% at epoch %d", state.best_ema_top1, state.epoch)


def save_last_checkpoint(state, config, meta, rank, world_size):
    """The mid-epoch save of MODEL-last.ckpt. Every rank takes part: BN statistics are averaged first."""
    dist.average_over_ranks(state.rank_local_parameters(), world_size)
    if rank == 0:
        save_train_state(state, Path(config.ckpt_save_dir) / f"{config.model}-last.ckpt", meta)


def run_train_step(train_step, state, config, images, targets, lr):
    """One optimizer step on a loaded batch, with this step's drop-path seed and lr; counts it in `state`."""
    set_drop_path_seed(state.net, config.seed * 1000003 + state.step)
    loss, grad_norm, finite, loss_scale = train_step(ms.Tensor(images), ms.Tensor(targets), ms.Tensor(lr, ms.float32))
    state.step += 1
    state.batch_in_epoch += 1
    return float(loss.asnumpy()), float(grad_norm.asnumpy()), bool(finite.asnumpy()), float(loss_scale.asnumpy())


def record_skips(state, finite, loss_scale, config):
    """Count a skipped (non-finite) step; stop the run after `max_consecutive_skips` in a row."""
    if finite:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    log.info("epoch %d step %d: non-finite gradients, update skipped, loss scale now %g", state.epoch + 1,
             state.batch_in_epoch, loss_scale)
    if state.consecutive_skips >= config.max_consecutive_skips:
        raise TrainingDiverged(
            f"{state.consecutive_skips} consecutive steps had non-finite loss or gradients (limit "
            f"max_consecutive_skips={config.max_consecutive_skips}); stopping. The last good checkpoint is "
            f"{Path(config.ckpt_save_dir) / (config.model + '-last.ckpt')}; lower lr or check the data")


class ProgressWindow:
    """The steps since the last progress line: their speed, and the loss summed over the finite ones."""

    def __init__(self, state, total_steps):
        self.progress = Progress(total_steps).update(state.step)
        self.steps, self.finite_steps, self.loss_sum = 0, 0, 0.0

    def add(self, state, loss, finite, timed=True):
        """`timed=False` for a step whose time says nothing of the speed (a run's first step compiles the graph):
        the clock restarts after it."""
        self.steps += 1
        if timed:
            self.progress.update(state.step)
        else:
            self.progress.restart(state.step)
        if finite:
            self.finite_steps += 1
            self.loss_sum += loss


def log_progress(tensorboard, window, state, config, steps_per_epoch, world_size, lr, grad_norm, loss_scale):
    """One progress line (and TensorBoard scalars). Skipped steps count for speed and ETA, not for the mean loss;
    a window whose every step was skipped has no loss to show (and a non-finite grad norm is not plotted)."""
    scalars = {"train/lr": lr, "train/loss_scale": loss_scale}
    steps_per_second = window.progress.rate()
    if steps_per_second is not None:
        images_per_step = config.batch_size * config.accumulation_steps * world_size
        scalars["train/images_per_second"] = steps_per_second * images_per_step
        speed_text = (f"{scalars['train/images_per_second']:.1f} img/s ETA "
                      f"{format_duration((window.progress.total - state.step) / steps_per_second)}")
    else:
        speed_text = "(img/s and ETA from the next step on)"
    if math.isfinite(grad_norm):  # tensorboardX rejects inf/NaN with a bare "NaN or Inf found in input tensor."
        scalars["train/grad_norm"] = grad_norm
    if window.finite_steps:
        # Every rank skips the same steps (the gradients are all-reduced), so all of them take part here.
        scalars["train/loss"] = dist.mean_across_ranks(window.loss_sum / window.finite_steps, world_size)
        loss_text = f"{scalars['train/loss']:.4f}"
    else:
        loss_text = f"- ({window.steps} skipped)"
    log.info("epoch %d/%d step %d/%d loss %s lr %.3g loss_scale %g grad_norm %.3f %s", state.epoch + 1,
             config.epoch_size, state.batch_in_epoch, steps_per_epoch, loss_text, lr, loss_scale, grad_norm,
             speed_text)
    tensorboard.scalars(state.step, **scalars)


def format_metrics(metrics):
    return ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in metrics.items())


def main(argv=None):
    config = parse_config(argv, default_config=DEMO_CONFIG, description=__doc__.splitlines()[0])
    config.device_target = device.apply_device_target(config.device_target)
    config.amp_level = device.resolve_amp_level(config.amp_level, config.device_target)
    ranks = dist.init_distributed(config.distribute, config.collective_timeout)
    rank, world_size = ranks
    ms.set_seed(config.seed)
    check_writable(config.ckpt_save_dir)
    setup_logging(rank, config.ckpt_save_dir)
    tensorboard = TensorBoard(config.ckpt_save_dir, rank, config.tensorboard)
    if rank == 0:
        save_config(config, Path(config.ckpt_save_dir) / "config.yaml")
    log.info("config %s; rank %d of %d; global batch %d; device %s, amp_level %s; compiled CPU kernels %s; malloc %s",
             config.config or "(defaults)", rank, world_size, config.batch_size * world_size, config.device_target,
             config.amp_level, "on" if device.cpu_kernels_enabled() else "off", allocator.current())
    if config.device_target == "CPU" and config.amp_level != "O0":
        log.info("note: amp_level %s on CPU is slower than O0 (RepLKNet-31B here: ~19 s vs 2.1 s a step; the "
                 "compiled kernels are float32 only); pass --amp_level auto (O0 on CPU) unless you test AMP",
                 config.amp_level)

    train_samples, val_samples, class_names = load_data(config)
    steps_per_epoch = data.num_train_batches(len(train_samples), config.batch_size * config.accumulation_steps,
                                             world_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_samples)} training images cannot fill one batch of "
                          f"{config.batch_size * config.accumulation_steps} on each of {world_size} rank(s)")

    state = build_train_state(config, len(class_names))
    if rank == 0:
        check_free_space(config.ckpt_save_dir, state)
    lr_at = create_lr_schedule(config, steps_per_epoch)
    if config.resume:
        resume(state, config)
    dist.broadcast_parameters(list(state.parameters().values()), ranks)
    dist.check_same_on_all_ranks({"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                                  "step": state.step}, ranks)
    # auto's per-shape choice of conv implementation is measured (and logged) before the step compiles: it is part
    # of the graph.
    dwconv.decide_for(state.net, (config.batch_size, 3, config.image_resize, config.image_resize))
    train_step = make_train_step(state, config,
                                 all_reduce=dist.make_gradient_mean(world_size, state.optimizer.parameters),
                                 net=device.mixed_precision(state.net, config.amp_level))
    cache_dir = compile_cache.step_cache_dir(config, world_size) if config.jit else None
    if cache_dir is not None and not compile_cache.cache_available():
        log.info("train step compile cache: not used (another train step in this process used it)")
        cache_dir = None
    if cache_dir is not None:
        log.info("train step compile cache: %s (%s)", cache_dir, "reused" if cache_dir.exists() else
                 "new: compiling; MindSpore's two warnings that follow, about a hash file it cannot open, say the same")
        train_step = compile_cache.with_compile_cache(train_step, cache_dir)
    eval_step = make_eval_step(device.mixed_precision(state.net, config.amp_level), config.jit)
    sum_across_ranks = dist.make_sum_across_ranks(world_size)
    meta = {"model": config.model, "build_args": state.net.build_args, "class_names": class_names,
            "config": {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}}
    stats = data.DataStats()
    # One train step consumes accumulation_steps micro-batches: the loader yields them as one batch.
    data_config = Config(config, batch_size=config.batch_size * config.accumulation_steps)
    total_steps = config.epoch_size * steps_per_epoch
    log.info("%d train / %d val images, %d classes; %d steps per epoch, %d in all", len(train_samples),
             len(val_samples), len(class_names), steps_per_epoch, total_steps)

    run_start, first_step = time.time(), state.step
    metrics = None
    while state.epoch < config.epoch_size:
        epoch = state.epoch
        state.net.set_train(True)
        window = ProgressWindow(state, total_steps)
        batches = data.train_batches(train_samples, len(class_names), data_config, epoch, rank, world_size,
                                     start_batch=state.batch_in_epoch, stats=stats)
        for images, targets in batches:
            lr = lr_at(state.step)
            step_start = time.time()
            loss, grad_norm, finite, loss_scale = run_train_step(train_step, state, config, images, targets, lr)
            compiled_now = state.step == first_step + 1
            if compiled_now:
                log.info("first step done in %.1f s%s", time.time() - step_start,
                         " (compiling the train step included)" if config.jit else "")
            record_skips(state, finite, loss_scale, config)
            window.add(state, loss, finite, timed=not compiled_now)
            if state.batch_in_epoch % config.log_interval == 0 or state.batch_in_epoch == steps_per_epoch:
                log_progress(tensorboard, window, state, config, steps_per_epoch, world_size, lr, grad_norm,
                             loss_scale)
                window = ProgressWindow(state, total_steps)
            if config.ckpt_save_steps and state.step % config.ckpt_save_steps == 0 \
                    and state.batch_in_epoch < steps_per_epoch:
                save_last_checkpoint(state, config, meta, rank, world_size)
            if config.max_steps and state.step >= config.max_steps:
                break
        if config.max_steps and state.step >= config.max_steps and state.batch_in_epoch < steps_per_epoch:
            log.info("max_steps=%d reached mid-epoch", config.max_steps)
            save_last_checkpoint(state, config, meta, rank, world_size)
            break
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        dist.average_over_ranks(state.rank_local_parameters(), world_size)  # BN statistics: validate what is saved
        metrics = None
        if config.val_while_train and (state.epoch % config.val_interval == 0 or state.epoch == config.epoch_size):
            metrics = validate(state, eval_step, val_samples, config, rank, world_size, sum_across_ranks, stats)
            log.info("epoch %d validation: %s", state.epoch, format_metrics(metrics))
            tensorboard.scalars(state.step, **{f"val/{key}": value for key, value in metrics.items()})
        if stats.skipped:
            log.info("epoch %d: %d unreadable image(s) skipped or replaced", state.epoch, stats.skipped)
            stats.skipped = 0
        if rank == 0:
            save_epoch_checkpoints(state, config, meta, metrics)
        if config.max_steps and state.step >= config.max_steps:
            break
    validated = state.best_epoch >= 0
    log.info("done in %s: %d steps, %d skipped; %s", format_duration(time.time() - run_start), state.step,
             state.skipped_steps, f"best top-1 {state.best_top1:.2f}% (epoch {state.best_epoch})" if validated
             else "not validated (no epoch with validation finished)")
    summary = {"epochs": state.epoch, "steps": state.step, "skipped_steps": state.skipped_steps,
               "unreadable_images": len(stats.bad_files), "best_top1": state.best_top1 if validated else None,
               "seconds": round(time.time() - run_start, 1)}
    if metrics is not None:
        summary.update(metrics)
    log.info(json.dumps(summary))
    tensorboard.close()
    close_logging()
    return state, metrics


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, data.DataError, TrainingDiverged, dist.DistributedError,
            device.DeviceError) as error:
        close_logging()
        sys.exit(f"error: {error}")
    except RuntimeError as error:
        explanation = dist.explain_failure(error)
        if explanation is None:
            raise
        sys.exit(f"error: {explanation}")
