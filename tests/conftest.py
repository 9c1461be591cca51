"""Shared fixtures: a tiny random Llama base, random LoRA adapters, an isolated cache home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402

from delta_router.testing import RandomAdapterFactory, make_tiny_base  # noqa: E402

# Tiny models gain nothing from threads, and extra threads thrash when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own DELTA_ROUTER_HOME, so caches never leak between tests."""
    home = tmp_path / "home"
    monkeypatch.setenv("DELTA_ROUTER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base with another hidden size: adapters of it must not fit ``tiny_base``."""
    return make_tiny_base(tmp_path_factory.mktemp("other_base"), hidden_size=32, seed=1)


@pytest.fixture(scope="session")
def adapter_factory(tiny_base: Path) -> RandomAdapterFactory:
    return RandomAdapterFactory(tiny_base)


@pytest.fixture(scope="session")
def adapters(tiny_base: Path, adapter_factory, tmp_path_factory) -> list[Path]:
    """Four random r=8 adapters of the tiny base (B scaled down so shifts stay moderate)."""
    root = tmp_path_factory.mktemp("adapters")
    return [adapter_factory.make(root / f"adapter-{i}", seed=i, scale=0.1) for i in range(4)]
