"""Conditional batch normalisation (CBN), the norm of every encoder/decoder block in supplement Table 1.

*Reading*: the supplement names CBN but not its condition. We condition on the **product category**: one
shared :class:`torch.nn.BatchNorm2d` without affine parameters (shared running statistics) followed by a
per-class scale ``gamma`` and shift ``beta`` looked up in two :class:`torch.nn.Embedding` tables (de Vries et
al. 2017; Miyato & Koyama 2018). With one class this is exactly ``nn.BatchNorm2d(affine=True)`` -- a
per-category model; with several classes it is one joint model whose categories share convolutions and
statistics but not the affine part.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError


def check_class_ids(y: Tensor | None, batch_size: int, num_classes: int, check_range: bool = True) -> None:
    """Raise :class:`TrustMAEError` unless ``y`` is ``None`` or a ``(batch_size,)`` integer tensor of ids.

    Args:
        y: ``(B,)`` long class ids in ``[0, num_classes)``, or ``None`` (class 0 for every sample).
        batch_size: the batch size ``B`` the ids must match.
        num_classes: number of classes of the CBN layers.
        check_range: also check the id range (one device synchronisation on GPU).
    """
    if y is None:
        return
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != batch_size:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise TrustMAEError(
            f"class ids y must be a ({batch_size},) tensor, one id per image, got {shape}; "
            "pass y=torch.tensor([...]) or None for class 0"
        )
    if y.dtype not in (torch.int64, torch.int32):
        raise TrustMAEError(f"class ids y must be an integer tensor, got {y.dtype}; use y.long()")
    if check_range and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise TrustMAEError(
            f"class ids y must lie in [0, {num_classes}), got {y.min().item()}..{y.max().item()}; "
            f"build the model with num_classes > {y.max().item()} or fix the ids"
        )


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch norm: ``gamma[y] * BN(x) + beta[y]`` with BN statistics shared by all classes.

    Args:
        num_features: channels ``C``.
        num_classes: number of classes (product categories); 1 = plain batch norm.
        eps: added to the variance, as in :class:`torch.nn.BatchNorm2d`.
        momentum: running-statistics momentum as in :class:`torch.nn.BatchNorm2d` (``None``: cumulative).

    Example:
        >>> cbn = ConditionalBatchNorm2d(8, num_classes=3)
        >>> cbn(torch.randn(4, 8, 5, 5), torch.tensor([0, 1, 2, 1])).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, num_features: int, num_classes: int = 1, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        if num_features < 1 or num_classes < 1:
            raise TrustMAEError(
                f"ConditionalBatchNorm2d needs num_features >= 1 and num_classes >= 1, got "
                f"{num_features} and {num_classes}; pass positive sizes"
            )
        self.num_features = num_features
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)  # (K, C), per-class scale
        self.beta = nn.Embedding(num_classes, num_features)  # (K, C), per-class shift
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor | None = None, validate: bool = True) -> Tensor:
        """Normalise ``x`` with the shared statistics, then apply each sample's class affine.

        Args:
            x: ``(B, C, H, W)`` features.
            y: ``(B,)`` long class ids, or ``None`` for class 0.
            validate: check ``y`` (shape, dtype, range). :class:`~trustmae_lib.model.trustmae.TrustMAE` checks once per
                forward and passes ``False`` to its layers.

        Returns:
            ``(B, C, H, W)``.
        """
        if validate:
            check_class_ids(y, x.shape[0], self.num_classes)
        out = self.bn(x)
        if y is None:
            gamma = self.gamma.weight[0].view(1, -1, 1, 1)  # (1, C, 1, 1)
            beta = self.beta.weight[0].view(1, -1, 1, 1)
        else:
            gamma = self.gamma(y)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
            beta = self.beta(y)[:, :, None, None]
        return out * gamma + beta

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_classes={self.num_classes}"
