"""Shared pytest fixtures. ``benchmarks/`` is on sys.path: the tests share its fault scenarios (``faults``) and the
lvis-api oracle (``lvis_oracle``)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny training steps: one thread is fastest and immune to other processes competing for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _second_backward_doubles(loss_fn, x, *args):
    """A custom autograd Function survives ``retain_graph=True``: a second backward adds the same gradient again."""
    import torch

    x = x.detach().clone().requires_grad_()
    loss = loss_fn(x, *args)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    return loss, x


@pytest.fixture
def second_backward():
    """``second_backward(loss_fn, x, *args)``: assert that a second backward doubles the gradient; returns
    (loss, x) for further checks."""
    return _second_backward_doubles
