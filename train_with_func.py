"""Train RepLKNet: config -> data -> model -> optimizer and schedule -> train step -> epoch loop -> checkpoints.

    python train_with_func.py                                   # the built-in demo (configs/demo.yaml)
    python train_with_func.py --config configs/replknet31_base.yaml --data_dir /data/imagenet
    msrun --worker_num=8 --local_worker_num=8 train_with_func.py --config ... --distribute True

Every key of the config is also a flag (`--lr 1e-3`); see `python train_with_func.py --help`. To debug the step
in a debugger, run with `--jit False`: the identical step runs eagerly.
"""
import json
import math
import sys
import time
from pathlib import Path

import mindspore as ms

from replknet_fn import compile_cache, data, dist, dwconv
from replknet_fn.checkpoint import (CheckpointError, check_free_space, check_writable, find_resume_checkpoint,
                                    link_or_copy, restore_train_state, save_train_state, select_kept)
from replknet_fn.config import Config, ConfigError, parse_config, save_config
from replknet_fn.evaluation import evaluate, make_eval_step
from replknet_fn.model import create_model, set_drop_path_seed
from replknet_fn.optim import create_optimizer
from replknet_fn.parameters import write_parameter
from replknet_fn.pretrained import load_pretrained
from replknet_fn.schedule import create_lr_schedule
from replknet_fn.step import make_train_step
from replknet_fn.train_state import EMA, TrainState, create_loss_scale

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


class TrainingDiverged(RuntimeError):
    pass


class RunLog:
    """Rank 0 prints and appends to ckpt_save_dir/train.log and writes TensorBoard scalars; other ranks are
    silent."""

    def __init__(self, directory, rank, tensorboard):
        self.active = rank == 0
        self.file = open(Path(directory) / "train.log", "a") if self.active else None
        self.writer = None
        if self.active and tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(Path(directory) / "tensorboard"))

    def __call__(self, message):
        if self.active:
            line = f"[{time.strftime('%H:%M:%S')}] {message}"
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()

    def scalars(self, step, **values):
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def load_data(config, log):
    if not config.data_dir:
        from replknet_fn.demo_data import ensure_demo_dataset
        config.data_dir = str(ensure_demo_dataset(config.demo_data_dir))
        log(f"no data_dir given: using the built-in demo data set in {config.data_dir}")
    train_samples, val_samples, class_names = data.find_splits(config.data_dir)
    if len(class_names) != config.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but {config.data_dir}/train has {len(class_names)} "
                          "class folders; set --num_classes to match")
    if config.scan_data:
        log(f"scanning {len(train_samples) + len(val_samples)} images...")
        bad = data.scan_images(train_samples + val_samples, config.num_parallel_workers)
        for path, error in bad:
            log(f"  unreadable: {path}: {error}")
        log(f"scan: {len(bad)} unreadable image(s); they will be skipped")
    return train_samples, val_samples, class_names


def build_train_state(config, num_classes):
    net = create_model(config.model, num_classes=num_classes, drop_path_rate=config.drop_path_rate,
                       large_kernel_impl=config.large_kernel_impl, recompute=config.recompute)
    if config.pretrained:
        load_pretrained(net, config.ckpt_path)
    optimizer = create_optimizer(net, config)
    ema = EMA(net, config.ema_decay) if config.ema else None
    return TrainState(net, optimizer, create_loss_scale(config), ema)


def forward_network(net, amp_level):
    """The network the step differentiates: `net` itself, or wrapped by MindSpore AMP (same parameters)."""
    if amp_level == "O0":
        return net
    return ms.amp.auto_mixed_precision(net, amp_level)


def resume(state, config, log):
    path = config.resume
    if path == "auto":
        path = find_resume_checkpoint(config.ckpt_save_dir, log)
        if path is None:
            log(f"resume auto: no valid checkpoint in {config.ckpt_save_dir}; starting from scratch")
            return
    restore_train_state(state, path)
    log(f"resumed from {path}: epoch {state.epoch}, batch {state.batch_in_epoch}, step {state.step}")


def swap_in_ema(state):
    """Exchange the network weights and the EMA weights (call again to swap back)."""
    for average, source in zip(state.ema.averages, state.ema.sources):
        current = source.asnumpy().copy()  # asnumpy() may alias the buffer that copy_ overwrites next
        write_parameter(source, average.asnumpy().copy())
        write_parameter(average, current)


def validate(state, eval_step, val_samples, config, rank, world_size, sum_across_ranks, log, stats=None):
    batches = data.eval_batches(val_samples, config, rank, world_size, stats=stats)
    metrics = evaluate(state.net, eval_step, batches, sum_across_ranks, log=log,
                       num_batches=data.num_eval_batches(len(val_samples), config.batch_size, world_size))
    if state.ema is not None:
        swap_in_ema(state)
        batches = data.eval_batches(val_samples, config, rank, world_size)
        ema_metrics = evaluate(state.net, eval_step, batches, sum_across_ranks)
        swap_in_ema(state)
        metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
    return metrics


def save_epoch_checkpoints(state, config, meta, metrics, log):
    """last (always), the epoch checkpoint under the keep policy, and best by validation top-1."""
    directory = Path(config.ckpt_save_dir)
    last = directory / f"{config.model}-last.ckpt"
    top1 = metrics.get("top1", -1.0) if metrics else -1.0
    improved = metrics is not None and top1 > state.best_top1
    if improved:
        state.best_top1, state.best_epoch = top1, state.epoch
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
        log(f"new best top-1 {top1:.2f}% at epoch {state.epoch}")


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


def record_skips(state, finite, loss_scale, config, log):
    """Count a skipped (non-finite) step; stop the run after `max_consecutive_skips` in a row."""
    if finite:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    log(f"epoch {state.epoch + 1} step {state.batch_in_epoch}: non-finite gradients, update skipped, loss scale "
        f"now {loss_scale:g}")
    if state.consecutive_skips >= config.max_consecutive_skips:
        raise TrainingDiverged(
            f"{state.consecutive_skips} consecutive steps had non-finite loss or gradients (limit "
            f"max_consecutive_skips={config.max_consecutive_skips}); stopping. The last good checkpoint is "
            f"{Path(config.ckpt_save_dir) / (config.model + '-last.ckpt')}; lower lr or check the data")


class ProgressWindow:
    """Steps and time since the last progress line, and the loss summed over its finite steps."""

    def __init__(self):
        self.start, self.steps, self.timed_steps, self.finite_steps, self.loss_sum = time.time(), 0, 0, 0, 0.0

    def add(self, loss, finite, timed=True):
        """`timed=False` for a step whose time says nothing of the speed (a run's first step compiles the graph):
        the clock restarts after it."""
        self.steps += 1
        if timed:
            self.timed_steps += 1
        else:
            self.start = time.time()
        if finite:
            self.finite_steps += 1
            self.loss_sum += loss


def log_progress(log, window, state, config, steps_per_epoch, total_steps, world_size, lr, grad_norm, loss_scale):
    """One progress line (and TensorBoard scalars). Skipped steps count for speed and ETA, not for the mean loss;
    a window whose every step was skipped has no loss to show (and a non-finite grad norm is not plotted)."""
    scalars = {"train/lr": lr, "train/loss_scale": loss_scale}
    if window.timed_steps:
        elapsed = max(time.time() - window.start, 1e-9)
        scalars["train/images_per_second"] = (config.batch_size * config.accumulation_steps * world_size
                                              * window.timed_steps / elapsed)
        eta = elapsed / window.timed_steps * (total_steps - state.step)
        speed_text = f"{scalars['train/images_per_second']:.1f} img/s ETA {format_duration(eta)}"
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
    log(f"epoch {state.epoch + 1}/{config.epoch_size} step {state.batch_in_epoch}/{steps_per_epoch} "
        f"loss {loss_text} lr {lr:.3g} loss_scale {loss_scale:g} grad_norm {grad_norm:.3f} {speed_text}")
    log.scalars(state.step, **scalars)


def main(argv=None):
    config = parse_config(argv, default_config=DEMO_CONFIG, description=__doc__.splitlines()[0])
    rank, world_size = dist.init_distributed(config.distribute, config.collective_timeout)
    ms.set_seed(config.seed)
    check_writable(config.ckpt_save_dir)
    log = RunLog(config.ckpt_save_dir, rank, config.tensorboard)
    if rank == 0:
        save_config(config, Path(config.ckpt_save_dir) / "config.yaml")
    log(f"config {config.config or '(defaults)'}; rank {rank} of {world_size}; "
        f"global batch {config.batch_size * world_size}")
    if config.device_target == "CPU" and config.amp_level != "O0":
        log(f"note: amp_level {config.amp_level} on CPU is slower than O0 (RepLKNet-31B here: ~19 s vs 2.1 s a "
            f"step; the compiled kernels are float32 only); pass --amp_level O0 unless you test AMP itself")

    train_samples, val_samples, class_names = load_data(config, log)
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
        resume(state, config, log)
    dist.broadcast_parameters(list(state.parameters().values()), world_size)
    dist.check_same_on_all_ranks({"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                                  "step": state.step}, world_size)
    # auto's per-shape choice of conv implementation is measured before the step compiles (it is part of the graph).
    verdicts = dwconv.decide_for(state.net, (config.batch_size, 3, config.image_resize, config.image_resize))
    if verdicts:
        log("large-kernel convs (auto): " + ", ".join(f"{shape} {impl}" for shape, impl in verdicts.items()))
    train_step = make_train_step(state, config,
                                 all_reduce=dist.make_gradient_mean(world_size, state.optimizer.parameters),
                                 net=forward_network(state.net, config.amp_level))
    cache_dir = compile_cache.step_cache_dir(config, world_size) if config.jit else None
    if cache_dir is not None and not compile_cache.cache_available():
        log("train step compile cache: not used (another train step in this process used it)")
        cache_dir = None
    if cache_dir is not None:
        log(f"train step compile cache: {cache_dir} ({'reused' if cache_dir.exists() else 'new: compiling'})")
        train_step = compile_cache.with_compile_cache(train_step, cache_dir)
    eval_step = make_eval_step(forward_network(state.net, config.amp_level), config.jit)
    sum_across_ranks = dist.make_sum_across_ranks(world_size)
    meta = {"model": config.model, "build_args": state.net.build_args, "class_names": class_names,
            "config": {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}}
    stats = data.DataStats()
    # One train step consumes accumulation_steps micro-batches: the loader yields them as one batch.
    data_config = Config(config, batch_size=config.batch_size * config.accumulation_steps)
    total_steps = config.epoch_size * steps_per_epoch
    log(f"{len(train_samples)} train / {len(val_samples)} val images, {len(class_names)} classes; "
        f"{steps_per_epoch} steps per epoch, {total_steps} in all")

    run_start, first_step = time.time(), state.step
    metrics = None
    while state.epoch < config.epoch_size:
        epoch = state.epoch
        state.net.set_train(True)
        window = ProgressWindow()
        batches = data.train_batches(train_samples, len(class_names), data_config, epoch, rank, world_size,
                                     start_batch=state.batch_in_epoch, stats=stats)
        for images, targets in batches:
            lr = lr_at(state.step)
            step_start = time.time()
            loss, grad_norm, finite, loss_scale = run_train_step(train_step, state, config, images, targets, lr)
            compiled_now = state.step == first_step + 1
            if compiled_now:
                log(f"first step done in {time.time() - step_start:.1f} s"
                    + (" (compiling the train step included)" if config.jit else ""))
            record_skips(state, finite, loss_scale, config, log)
            window.add(loss, finite, timed=not compiled_now)
            if state.batch_in_epoch % config.log_interval == 0 or state.batch_in_epoch == steps_per_epoch:
                log_progress(log, window, state, config, steps_per_epoch, total_steps, world_size, lr, grad_norm,
                             loss_scale)
                window = ProgressWindow()
            if config.ckpt_save_steps and state.step % config.ckpt_save_steps == 0 \
                    and state.batch_in_epoch < steps_per_epoch:
                save_last_checkpoint(state, config, meta, rank, world_size)
            if config.max_steps and state.step >= config.max_steps:
                break
        if config.max_steps and state.step >= config.max_steps and state.batch_in_epoch < steps_per_epoch:
            log(f"max_steps={config.max_steps} reached mid-epoch")
            save_last_checkpoint(state, config, meta, rank, world_size)
            break
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        dist.average_over_ranks(state.rank_local_parameters(), world_size)  # BN statistics: validate what is saved
        metrics = None
        if config.val_while_train and (state.epoch % config.val_interval == 0 or state.epoch == config.epoch_size):
            metrics = validate(state, eval_step, val_samples, config, rank, world_size, sum_across_ranks, log,
                               stats)
            log(f"epoch {state.epoch} validation: " + ", ".join(f"{key} {value:.4f}" if isinstance(value, float)
                                                                else f"{key} {value}"
                                                                for key, value in metrics.items()))
            log.scalars(state.step, **{f"val/{key}": value for key, value in metrics.items()})
        if stats.skipped:
            log(f"epoch {state.epoch}: {stats.skipped} unreadable image(s) skipped or replaced")
            stats.skipped = 0
        if rank == 0:
            save_epoch_checkpoints(state, config, meta, metrics, log)
        if config.max_steps and state.step >= config.max_steps:
            break
    log(f"done in {format_duration(time.time() - run_start)}: {state.step} steps, {state.skipped_steps} skipped; "
        f"best top-1 {state.best_top1:.2f}% (epoch {state.best_epoch})")
    summary = {"epochs": state.epoch, "steps": state.step, "skipped_steps": state.skipped_steps,
               "unreadable_images": len(stats.bad_files), "best_top1": state.best_top1,
               "seconds": round(time.time() - run_start, 1)}
    if metrics is not None:
        summary.update(metrics)
    log(json.dumps(summary))
    log.close()
    return state, metrics


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, data.DataError, TrainingDiverged, dist.DistributedError) as error:
        sys.exit(f"error: {error}")
    except RuntimeError as error:
        explanation = dist.explain_failure(error)
        if explanation is None:
            raise
        sys.exit(f"error: {explanation}")
