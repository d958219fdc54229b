"""The decode-time vocabulary projection equals the layer it stands in for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune.modeling import projection
from glmtune.modeling.projection import project_to_vocab


@pytest.fixture(scope="module")
def head() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 20000, bias=False)


@pytest.fixture(autouse=True, params=["packed", "mkl"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the oneDNN-reordered weight and with the MKL ``W @ h^T`` form."""
    if request.param == "packed" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("GLMTUNE_PACKED_PROJECTION", "1" if request.param == "packed" else "0")
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 7, 32, 33])
def test_projection_equals_the_linear_layer(head: nn.Linear, rows: int) -> None:
    hidden = torch.randn(1, rows, 64)
    with torch.no_grad():
        got = project_to_vocab(hidden, head)
        want = F.linear(hidden, head.weight)
    assert got.shape == want.shape == (1, rows, 20000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_logits_alone_and_in_a_small_batch(head: nn.Linear) -> None:
    hidden = torch.randn(4, 64)
    with torch.no_grad():
        batched = project_to_vocab(hidden, head)
        alone = project_to_vocab(hidden[:1], head)
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-5, atol=1e-5)


def test_bias_is_added(head: nn.Linear) -> None:
    layer = nn.Linear(64, 20000)
    hidden = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(project_to_vocab(hidden, layer), layer(hidden), rtol=1e-5, atol=1e-5)


def test_training_keeps_the_layer_call_and_its_gradients(head: nn.Linear) -> None:
    hidden = torch.randn(2, 64, requires_grad=True)
    project_to_vocab(hidden, head).sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None
    head.weight.grad = None


def test_the_reordered_weight_is_made_once_and_remade_when_the_weight_changes(kernel: str) -> None:
    layer = nn.Linear(64, 20000, bias=False)
    hidden = torch.randn(3, 64)
    with torch.no_grad():
        project_to_vocab(hidden, layer)
        first = projection._PACKED.get(layer)
        project_to_vocab(hidden, layer)
        assert projection._PACKED.get(layer) is first
        layer.weight.mul_(2)  # an optimizer step or a reload changes the weight in place
        torch.testing.assert_close(project_to_vocab(hidden, layer), layer(hidden), rtol=1e-5, atol=1e-5)
    if kernel == "packed":
        assert first is not None and projection._PACKED.get(layer) is not first
    else:
        assert first is None and layer not in projection._PACKED
    assert "weight" in layer.state_dict() and len(layer.state_dict()) == 1  # nothing leaks into checkpoints
