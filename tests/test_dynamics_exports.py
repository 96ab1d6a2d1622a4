"""The training-dynamics names are public where the README says: ``net2grow`` (loaded on first
use, like the other strategy names), ``net2grow.strategies`` and their home modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

NAMES = {
    "Early": "net2grow.strategies.policies",
    "PlateauWidths": "net2grow.strategies.policies",
    "RankWidths": "net2grow.strategies.policies",
    "CohortLR": "net2grow.growth.cohorts",
    "CohortLRPlugin": "net2grow.strategies.cohort_lr",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_names_import_from_the_top_and_from_strategies(name: str) -> None:
    import importlib

    import net2grow
    import net2grow.strategies

    home = getattr(importlib.import_module(NAMES[name]), name)
    assert getattr(net2grow, name) is home
    assert getattr(net2grow.strategies, name) is home
    assert name in net2grow.__all__ and name in net2grow.strategies.__all__
    namespace: dict[str, object] = {}
    exec(f"from net2grow import {name} as got", namespace)
    assert namespace["got"] is home


def test_cohort_lr_from_the_top_does_not_import_avalanche() -> None:
    """``CohortLR`` needs torch only: taking it from ``net2grow`` keeps avalanche unloaded,
    while ``CohortLRPlugin`` loads it."""
    code = (
        "import sys; from net2grow import CohortLR; "
        "print('avalanche' in sys.modules, CohortLR.__module__); "
        "from net2grow import CohortLRPlugin; print('avalanche' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
        cwd=REPO,
    ).stdout.split()
    assert out == ["False", "net2grow.growth.cohorts", "True"]


def test_unknown_names_still_raise() -> None:
    import net2grow

    with pytest.raises(AttributeError, match="has no attribute 'CohortLRPlugins'"):
        net2grow.CohortLRPlugins  # noqa: B018
