"""Shared fixtures. Room-specific fixtures live in their own test modules or tests/support/<room>.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from configs import PROJECT_ROOT, load_settings

SHARED_DATA = (PROJECT_ROOT.parent / "shared" / "data").resolve()
MESSY_DOCS = SHARED_DATA / "messy_docs"
CMRC_TRIAL = SHARED_DATA / "cmrc2018" / "squad-style-data_cmrc2018_trial.json"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when none is present)")
    config.addinivalue_line("markers", "browser: drives Chromium through Playwright")
    config.addinivalue_line("markers", "slow: runs real models on CPU (minutes)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder missing: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def messy_docs(shared_data) -> Path:
    return MESSY_DOCS


@pytest.fixture(scope="session")
def cmrc_trial(shared_data) -> Path:
    return CMRC_TRIAL


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The model pack folder (ZHIWEN_PATHS__MODELS_DIR or models/)."""
    return load_settings().models_dir


def require_model(models_dir: Path, name: str) -> Path:
    """Fail loudly (not skip) when a model of the pack is missing: CI pulls the pack before the tests."""
    p = models_dir / name
    if not p.is_dir():
        pytest.fail(f"model folder {p} is missing: run `python -m modelpack pull demo` first")
    return p


@pytest.fixture()
def tmp_settings(tmp_path, monkeypatch):
    """Settings whose knowledge-base root is a fresh temporary folder."""
    kb_root = tmp_path / "kb"
    kb_root.mkdir()
    monkeypatch.setenv("ZHIWEN_PATHS__KB_ROOT", str(kb_root))
    return load_settings()
