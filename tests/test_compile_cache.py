"""MindSpore's compile cache for the train step: a warm cache gives the very steps an uncached run takes, and each
step graph has its own cache directory."""
import json
import subprocess
import sys
import textwrap

import pytest

from replknet_fn import compile_cache
from replknet_fn.compile_cache import step_cache_dir
from replknet_fn.config import DEFAULTS, Config

from conftest import ROOT

STEPS_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import mindspore as ms
    import numpy as np
    from replknet_fn import build_replknet
    from replknet_fn.compile_cache import with_compile_cache
    from replknet_fn.config import DEFAULTS, Config
    from replknet_fn.model import set_drop_path_seed
    from replknet_fn.optim import create_optimizer
    from replknet_fn.step import make_train_step
    from replknet_fn.train_state import EMA, TrainState, create_loss_scale

    ms.set_seed(int(sys.argv[1]))
    config = Config(DEFAULTS, lr=1e-3, loss_scale_window=2)
    net = build_replknet([5, 3], [1, 1], [8, 16], small_kernel=3, num_classes=4, drop_path_rate=0.2)
    net.set_train(True)
    state = TrainState(net, create_optimizer(net, config), create_loss_scale(config), EMA(net, 0.9))
    step = make_train_step(state, config)
    if sys.argv[2]:
        step = with_compile_cache(step, sys.argv[2])
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.normal(size=(4, 3, 16, 16)).astype(np.float32))
    targets = ms.Tensor(np.eye(4, dtype=np.float32)[rng.integers(0, 4, 4)])
    losses = []
    for i in range(3):
        set_drop_path_seed(net, i)
        losses.append(float(step(images, targets, ms.Tensor(1e-3, ms.float32))[0].asnumpy()))
    print(json.dumps({{"losses": losses, "scale": float(state.loss_scale.value.asnumpy()),
                      "weights": {{name: float(np.abs(p.asnumpy()).sum())
                                  for name, p in state.parameters().items()}}}}))
""")


def run_steps(script, seed, cache):
    result = subprocess.run([sys.executable, str(script), str(seed), str(cache)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_warm_cache_gives_the_steps_of_an_uncached_run(tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS_SCRIPT.format(root=str(ROOT)))
    cache = tmp_path / "cache"
    uncached = run_steps(script, 0, "")
    cold = run_steps(script, 0, cache)
    assert list(cache.rglob("*.mindir")), "the first run wrote no cache"
    warm = run_steps(script, 0, cache)
    assert cold == uncached and warm == uncached
    # The cached graph reads the weights it is given, not those it was compiled with.
    assert run_steps(script, 1, cache) == run_steps(script, 1, "")


def cache_dir(**overrides):
    return step_cache_dir(Config(DEFAULTS, compile_cache_dir="/cache", **overrides), world_size=1)


def test_each_step_graph_gets_its_own_cache_directory():
    base = cache_dir()
    assert base.parent.as_posix() == "/cache" and base.name.startswith("train_step-")
    for graph_change in ({"batch_size": 32}, {"model": "replknet31_large"}, {"clip_grad": False}, {"opt": "sgd"},
                         {"drop_path_rate": 0.1}, {"image_resize": 256}, {"accumulation_steps": 2}):
        assert cache_dir(**graph_change) != base, graph_change
    for host_change in ({"lr": 1.0}, {"seed": 7}, {"epoch_size": 3}, {"data_dir": "/x"}, {"ckpt_save_dir": "/y"}):
        assert cache_dir(**host_change) == base, host_change


def test_cache_is_off_when_disabled_or_distributed():
    assert step_cache_dir(Config(DEFAULTS, compile_cache_dir=""), world_size=1) is None
    assert step_cache_dir(Config(DEFAULTS, compile_cache_dir="/cache"), world_size=2) is None


def test_prune_keeps_the_most_recently_used_entries_and_any_used_within_the_hour(tmp_path):
    import os
    import time

    from replknet_fn.compile_cache import prune
    now = time.time()
    for age_hours in range(6):
        entry = tmp_path / f"train_step-{age_hours}"
        entry.mkdir()
        os.utime(entry, (now - age_hours * 3600 - 60,) * 2)
    (tmp_path / "unrelated").mkdir()
    prune(tmp_path, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train_step-0", "train_step-1", "unrelated"]
    recent = tmp_path / "train_step-recent"
    recent.mkdir()
    prune(tmp_path, keep=1)  # train_step-0 is 1 minute old: kept although beyond `keep`
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train_step-0", "train_step-recent", "unrelated"]


def test_a_compile_that_fails_leaves_no_entry_behind(tmp_path, monkeypatch):
    """MindSpore may write an entry before the compile fails; a later run would load it and fail at once."""
    monkeypatch.setattr(compile_cache, "_used_in_this_process", False)
    entry = tmp_path / "train_step-abc"

    def failing_step(*args):
        entry.mkdir()
        (entry / "graph.mindir").write_bytes(b"half")
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError, match="compile failed"):
        compile_cache.with_compile_cache(failing_step, entry)()
    assert not entry.exists()
