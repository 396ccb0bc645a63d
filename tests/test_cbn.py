"""Conditional batch norm (supplement Table 1's CBN; reading: class = product category)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.cbn import ConditionalBatchNorm2d


def _pair(momentum=0.1):
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(6, num_classes=1, momentum=momentum)
    with torch.no_grad():  # non-trivial affine parameters, copied into the reference
        cbn.gamma.weight.uniform_(0.5, 1.5)
        cbn.beta.weight.normal_()
    bn = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(cbn.gamma.weight[0])
        bn.bias.copy_(cbn.beta.weight[0])
    return cbn, bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_class_equals_batchnorm_train_and_eval(momentum):
    cbn, bn = _pair(momentum)
    for step in range(3):  # training mode: outputs and running statistics
        x = torch.randn(5, 6, 4, 3) * (step + 1) + step
        y = None if step % 2 == 0 else torch.zeros(5, dtype=torch.long)
        torch.testing.assert_close(cbn(x, y), bn(x))
        torch.testing.assert_close(cbn.bn.running_mean, bn.running_mean)
        torch.testing.assert_close(cbn.bn.running_var, bn.running_var)
        assert int(cbn.bn.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
    cbn.eval()
    bn.eval()
    x = torch.randn(2, 6, 4, 3) * 3 + 1
    torch.testing.assert_close(cbn(x), bn(x))


def test_gradients_match_batchnorm():
    cbn, bn = _pair()
    x1 = torch.randn(4, 6, 3, 3, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (cbn(x1) ** 2).sum().backward()
    (bn(x2) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(cbn.gamma.weight.grad[0], bn.weight.grad)
    torch.testing.assert_close(cbn.beta.weight.grad[0], bn.bias.grad)


def test_per_class_affine_parameters():
    torch.manual_seed(1)
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    with torch.no_grad():
        cbn.gamma.weight.uniform_(0.5, 2.0)
        cbn.beta.weight.normal_()
    x = torch.randn(6, 4, 5, 5)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    out = cbn(x, y)
    # Reference: shared statistics over the whole batch, then each sample's own class parameters.
    normed = F.batch_norm(x, None, None, training=True, eps=cbn.bn.eps)
    expected = normed * cbn.gamma.weight[y][:, :, None, None] + cbn.beta.weight[y][:, :, None, None]
    torch.testing.assert_close(out, expected)
    # The same image under two classes gives two different outputs.
    same = x[:1].repeat(2, 1, 1, 1)
    pair = cbn(same, torch.tensor([0, 1]))
    assert not torch.allclose(pair[0], pair[1])


def test_only_used_classes_get_gradients():
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    cbn(torch.randn(4, 4, 3, 3), torch.tensor([0, 2, 2, 0])).pow(2).sum().backward()
    grad = cbn.gamma.weight.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.all(grad[1] == 0)


@pytest.mark.parametrize(
    "y",
    [torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 1]), [0, 1]],
)
def test_bad_class_ids(y):
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    with pytest.raises(TrustMAEError):
        cbn(torch.randn(2, 4, 3, 3), y)


def test_initialisation_is_identity_affine():
    cbn = ConditionalBatchNorm2d(4, num_classes=2)
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    out = cbn(x, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True, eps=cbn.bn.eps))
