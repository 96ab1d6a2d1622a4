"""Shared pytest configuration: hypothesis profiles, the device parametrisation, one intra-op
thread for the whole session and the strict-float32 fixture."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every test that takes ``device`` runs on the CPU, and on CUDA when one is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The tests run many tiny ops: one intra-op thread avoids the oversubscription that makes
    them several times slower on a shared 2-core machine. Restored at the end of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def strict_float32():
    """Exactness criteria are stated for float32: keep CUDA from using TF32 in matmuls and convs.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("strict_float32")``.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
