"""Fixtures of the emulated CUDA suite (issue 13): the emulated backend
library, built once per session (tests/simt/simt_build.py) and loaded as
torch.ops.selfattn_simt, and the emulated device reset before each test.
Tests here are marked `simt`; those also marked `slow` (the wider sweep) run
only when asked for: `pytest -m slow tests/simt` or SELFATTN_SIMT_SLOW=1.
"""
import os

import pytest
import torch

import simt_build

from selfattn.testing import assert_close_to_golden

HERE = os.path.dirname(os.path.abspath(__file__))
SM80 = dict(cc_major=8, smem_optin=166912)  # A100: what the CUDA backend targets
SM86 = dict(cc_major=8, smem_optin=101376)  # 99 KB per block: the D = 256 backward does not fit
SM75 = dict(cc_major=7, smem_optin=65536)   # no cp.async / bf16 mma: fallback kernels only


def pytest_collection_modifyitems(config, items):
    wanted = "slow" in (config.getoption("-m") or "") or os.environ.get("SELFATTN_SIMT_SLOW") == "1"
    if wanted:
        return
    slow = [item for item in items if str(item.fspath).startswith(HERE) and "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


@pytest.fixture(scope="session")
def simt_lib():
    reason = simt_build.unsupported_reason()
    if reason:
        pytest.skip(reason)
    path = simt_build.build()
    torch.ops.load_library(path)
    return path


@pytest.fixture
def simt(simt_lib):
    """torch.ops.selfattn_simt on an emulated sm80 with thread-order seed 0."""
    ops = torch.ops.selfattn_simt
    configure(0)
    ops.simt_take_log()
    yield ops
    configure(0)


def configure(seed, device=SM80, sm_count=108):
    torch.ops.selfattn_simt.simt_configure(seed, device["cc_major"], device["smem_optin"],
                                           sm_count)


def check_lse(lse, lse_lp, lse_64):
    """lse -inf exactly on the rows that see no key, the others within
    DESIGN.md's bound of the float64 reference's."""
    dead = torch.isneginf(lse_64)
    assert torch.equal(torch.isneginf(lse), dead), "lse is -inf exactly on rows that see no key"
    assert_close_to_golden("lse", lse[~dead], lse_lp[~dead].to(lse.dtype), lse_64[~dead])
