"""Test set-up: CPU only, 8 fake devices (before any backend call), markers for slow and GPU-only tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU backend at LLVM -O0: the suite's tiny models spend most of their time compiling, and -O0 compiles them
# ~25-30% faster (session 18); subprocesses (launchers, resume tests) inherit it. XLA's own HLO passes and the
# float semantics (no fast math at any level) are unchanged.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (run with --runslow)")
    config.addinivalue_line("markers", "gpu: needs a GPU (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    on_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)
