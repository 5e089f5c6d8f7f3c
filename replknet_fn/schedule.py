"""Learning-rate schedules as plain functions of the global step (Flax's `create_learning_rate_fn` style).

The training loop asks `lr_at(step)` for every step and passes the value into the jitted step, so the lr of a
step is exactly the schedule's value at that step, also after skipped (overflow) steps and after a resume.
"""
import math


def create_lr_schedule(config, steps_per_epoch):
    """Return `lr_at(step) -> float` for `config.scheduler` with linear warmup of `config.warmup_epochs`."""
    base_lr, min_lr = config.lr, config.min_lr
    warmup_steps = config.warmup_epochs * steps_per_epoch
    warmup_start = base_lr * config.warmup_factor

    def position(step):
        """Steps since the start (or epochs x steps_per_epoch with lr_epoch_stair)."""
        if config.lr_epoch_stair:
            return (step // steps_per_epoch) * steps_per_epoch
        return step

    def after_warmup(t):
        epoch = t / steps_per_epoch
        if config.scheduler == "constant":
            return base_lr
        if config.scheduler == "cosine_decay":
            decay_steps = max(config.decay_epochs * steps_per_epoch, 1)
            progress = min((t - warmup_steps) / decay_steps, 1.0)
            return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        if config.scheduler == "step_decay":
            return base_lr * config.decay_rate ** (int(epoch) // max(config.decay_epochs, 1))
        if config.scheduler == "multi_step_decay":
            return base_lr * config.decay_rate ** sum(int(epoch) >= m for m in config.milestones)
        raise ValueError(f"unknown scheduler {config.scheduler!r}")

    def lr_at(step):
        t = position(step)
        if t < warmup_steps:
            return warmup_start + (base_lr - warmup_start) * t / warmup_steps
        return after_warmup(t)

    return lr_at
