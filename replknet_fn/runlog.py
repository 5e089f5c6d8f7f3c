"""What a run tells its user: one logging setup, TensorBoard scalars, and one progress helper (rate and ETA).

    setup_logging(rank, ckpt_save_dir)      # rank 0: console and ckpt_save_dir/train.log; other ranks: warnings
    log = logging.getLogger(__name__)       # every module logs through the standard `logging` module
    progress = Progress(total); progress.update(done); progress.describe("images")   # "12.3 images/s, ETA 1m05s"

Every module of the package and both entry scripts log to loggers under "replknet_fn", which this setup gives
its handlers; so a data worker's warning (a file that does not decode) reaches train.log like the loop's lines.
"""
import logging
import sys
import time
from pathlib import Path

PACKAGE_LOGGER = "replknet_fn"
FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are when a record is emitted, not when the handler was made
    (a later run in the same process, or a test, may have replaced them)."""

    def __init__(self, stream_name):
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank=0, directory=None, stream="stdout"):
    """Send the package's log records to the console (rank 0: INFO and up on stdout, or on `stream` "stderr":
    tools whose stdout is their result; other ranks: WARNING and up on stderr, so they are silent unless
    something goes wrong) and, on rank 0, to `directory`/train.log. Calling it again (another run in the same
    process) replaces the handlers."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    console = _ConsoleHandler(stream if rank == 0 else "stderr")
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers = [console]
    if rank == 0 and directory is not None:
        handlers.append(logging.FileHandler(Path(directory) / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def close_logging():
    """Flush and close the package's handlers (the train.log file)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in list(logger.handlers):
        handler.flush()
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()


class TensorBoard:
    """Scalars to `directory`/tensorboard on rank 0 when `enabled`; otherwise nothing."""

    def __init__(self, directory, rank, enabled):
        self.writer = None
        if enabled and rank == 0:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(Path(directory) / "tensorboard"))

    def scalars(self, step, **values):
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class Progress:
    """Rate and time left of `total` units of work. The clock starts at the first `update` (or `restart`), so
    the first unit, which usually compiles a graph, can be left out of the rate."""

    def __init__(self, total):
        self.total, self.start, self.first, self.done = total, None, 0, 0

    def restart(self, done=0):
        self.start, self.first = time.time(), done

    def update(self, done):
        """Record that `done` units are finished; returns self."""
        if self.start is None:
            self.restart(done)
        self.done = done
        return self

    def rate(self):
        """Units per second since the clock started, or None before any unit was timed."""
        timed = self.done - self.first
        if self.start is None or timed <= 0:
            return None
        return timed / max(time.time() - self.start, 1e-9)

    def describe(self, unit):
        rate = self.rate()
        if rate is None:
            return f"({unit}/s and ETA from the next {unit} on)"
        return f"{rate:.1f} {unit}/s, ETA {format_duration((self.total - self.done) / rate)}"


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
