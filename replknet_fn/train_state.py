"""Everything a resume needs, in one place: the network, the optimizer, the loss scale, the EMA weights, and the
host-side counters of the loop. `checkpoint.py` saves and restores a `TrainState` as one file."""
from dataclasses import dataclass, field
from typing import Optional

import mindspore as ms
from mindspore import nn
from mindspore.common.parameter import Parameter, ParameterTuple

from replknet_fn.model import is_rng_state

BATCH_NORM_STATISTICS = (".moving_mean", ".moving_variance")


class LossScale(nn.Cell):
    """Loss-scale state. Dynamic: halve (by `factor`) on a non-finite step, grow after `window` finite steps in
    a row. Static: the scale never changes."""

    def __init__(self, scale, dynamic=True, factor=2.0, window=2000):
        super().__init__()
        self.value = Parameter(ms.Tensor(float(scale), ms.float32), name="loss_scale.value", requires_grad=False)
        self.good_steps = Parameter(ms.Tensor(0, ms.int32), name="loss_scale.good_steps", requires_grad=False)
        self.dynamic, self.factor, self.window = bool(dynamic), float(factor), int(window)


class EMA(nn.Cell):
    """Exponential moving average of every network parameter, BN statistics included (as timm's ModelEmaV2)."""

    def __init__(self, net, decay):
        super().__init__()
        params = [param for name, param in net.parameters_and_names() if not is_rng_state(name)]
        self.sources = ParameterTuple(params)
        self.averages = ParameterTuple([Parameter(param.data.copy(), name="ema." + param.name, requires_grad=False)
                                        for param in params])
        self.decay = float(decay)


def create_loss_scale(config):
    return LossScale(config.loss_scale, config.loss_scale_type == "dynamic", config.loss_scale_factor,
                     config.loss_scale_window)


@dataclass
class TrainState:
    net: nn.Cell
    optimizer: nn.Cell
    loss_scale: LossScale
    ema: Optional[EMA] = None
    epoch: int = 0                # epochs finished
    batch_in_epoch: int = 0       # batches of the current epoch already trained (a mid-epoch checkpoint)
    step: int = 0                 # train steps taken, skipped ones included: the schedule's position
    skipped_steps: int = 0        # steps whose update was skipped (non-finite gradients)
    consecutive_skips: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    best_ema_top1: float = -1.0
    best_ema_epoch: int = -1
    kept_checkpoints: list = field(default_factory=list)  # [(top1, epoch, file name)] of the epoch checkpoints

    def parameters(self):
        """Every Parameter a resume needs, by its (unique) name."""
        cells = [self.net, self.optimizer, self.loss_scale] + ([self.ema] if self.ema is not None else [])
        named = {}
        for cell in cells:
            for param in cell.get_parameters():
                named.setdefault(param.name, param)
        return named

    def rank_local_parameters(self):
        """The Parameters each data-parallel rank keeps its own value of: BN running statistics (each rank
        normalizes its own batch, as in the reference) and their EMA averages. The loop averages them over ranks
        before it validates or saves (timm's --dist-bn reduce), so what is validated is what is saved."""
        return [param for name, param in self.parameters().items() if name.endswith(BATCH_NORM_STATISTICS)]

    HOST_FIELDS = ("epoch", "batch_in_epoch", "step", "skipped_steps", "consecutive_skips", "best_top1",
                   "best_epoch", "best_ema_top1", "best_ema_epoch", "kept_checkpoints")

    def host_state(self):
        return {name: getattr(self, name) for name in self.HOST_FIELDS}

    def load_host_state(self, values):
        for name in self.HOST_FIELDS:
            if name in values:
                setattr(self, name, values[name])
