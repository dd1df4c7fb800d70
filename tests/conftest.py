"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and small matmuls run faster on one thread, and do not stall when other work
    shares the cores. A module opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def perturb():
    """Move every parameter of a model off its initial value (a norm weight of exactly 1, a zero
    bias or a zero sink would hide a mapping bug), and check that none stayed where it was.
    Sinks get a large spread so they take real attention mass."""

    @torch.no_grad()
    def _perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            spread = 2.0 if "sinks" in name else scale
            p.add_(torch.randn_like(p) * spread)
        unchanged = [name for name, p in model.named_parameters() if (p == before[name]).any()]
        assert not unchanged, f"parameters kept initial values: {unchanged}"
        return model.eval()

    return _perturb


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: on tensors this small a second thread only adds synchronisation
    (about half the CPU time goes to it on two cores), so run them on one and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
