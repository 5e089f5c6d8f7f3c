import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The team's reference folder (../shared/reference) when this checkout sits beside it; otherwise the unmodified
# copy in tests/data, so that a clone elsewhere (CI) tests against the same facts.
REFERENCE_CANDIDATES = [Path(os.environ["REPLKNET_REFERENCE"])] if "REPLKNET_REFERENCE" in os.environ else []
REFERENCE_CANDIDATES += [ROOT.parent / "shared" / "reference", ROOT / "tests" / "data"]
REFERENCE = next(path for path in REFERENCE_CANDIDATES if (path / "official_tiny_fixture.npz").exists())
FIXTURE = REFERENCE / "official_tiny_fixture.npz"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (few; still run in CI)")


@pytest.fixture(scope="session")
def fixture():
    if not FIXTURE.exists():
        pytest.fail(f"official fixture not found at {FIXTURE}; set REPLKNET_REFERENCE to the reference folder")
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def official_state_dict(fixture):
    return {key[len("param:"):]: value for key, value in fixture.items() if key.startswith("param:")}


def relative_error(actual, expected):
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


# ---- a short training run's arguments and result (test_train, test_faults) --------------------------------------

def run_args(data_dir, ckpt_dir, *extra):
    return ["--data_dir", str(data_dir), "--ckpt_save_dir", str(ckpt_dir), "--image_resize", "32",
            "--batch_size", "8", "--num_parallel_workers", "0", "--epoch_size", "2", "--warmup_epochs", "1",
            "--decay_epochs", "1", "--drop_path_rate", "0.2", "--ema", "True", "--ema_decay", "0.9",
            "--tensorboard", "False", "--log_interval", "3", "--mixup", "0.8", "--cutmix", "1.0",
            "--re_prob", "0.25", "--auto_augment", "randaug-m9-mstd0.5", *extra]


def final_weights(ckpt_dir):
    from replknet_fn.checkpoint import read_checkpoint
    params, meta = read_checkpoint(ckpt_dir / "replknet_tiny-last.ckpt")
    return {name: value.asnumpy() for name, value in params.items()}, meta


# ---- helpers of the multi-process tests ------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_env():
    """msrun starts workers as `python ...`: make that this interpreter."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def tail(path, lines=30):
    path = Path(path)
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"({path} missing)"
