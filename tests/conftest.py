import os
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
