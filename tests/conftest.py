"""Shared pytest configuration: GPU tests skip cleanly without CUDA, the chaos run only when
selected (``-m chaos``); nothing downloads."""

import os
import tempfile

import pytest
import torch

# Tests never reach the model hub: tiny presets are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Memory-plan measurements missing from the shipped table are cached per session, not in ~/.cache.
os.environ.setdefault("MODEDREAMER_MEMORY_CACHE", os.path.join(tempfile.mkdtemp(prefix="memplan-"), "memory_table.json"))


def pytest_collection_modifyitems(config, items):
    if "chaos" not in (config.getoption("markexpr") or ""):
        skip_chaos = pytest.mark.skip(reason="the chaos run takes minutes: select it with -m chaos")
        for item in items:
            if "chaos" in item.keywords:
                item.add_marker(skip_chaos)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
