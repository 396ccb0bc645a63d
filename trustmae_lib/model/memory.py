"""The memory module ``M in R^{512 x M}`` between encoder and decoder (supplement Table 1).

*Reading* (the main paper's method section is not in our source): every spatial location of the encoder
output is a query ``z``. It is compared with each of the ``M`` memory slots (*prototypes* of normal features),
the similarities become addressing weights, the weights are made **sparse**, and the read-out that replaces
``z`` is the weighted sum of slots. Configurable parts:

* ``similarity``: ``"cosine"`` (TrustMAE reading) or ``"dot"`` (MemAE, Gong et al. 2019).
* ``addressing``:
  ``"topk"`` -- ``softmax(sim / temperature)``, keep the ``k`` largest weights, renormalise to sum 1 (the
  authors' patent selects "a part of" the prototypes by similarity);
  ``"shrink"`` -- MemAE hard shrinkage ``relu(w - lambda) * w / (|w - lambda| + eps)``, then L1
  renormalisation;
  ``"softmax"`` -- dense weights.
* ``entropy_loss`` -- MemAE's sparsity term, the mean over locations of ``-sum_i w_i log(w_i + eps)``.

Slots are initialised like MemAE's official code, ``U(-1/sqrt(C), 1/sqrt(C))``;
:meth:`MemoryModule.init_from_features` offers a data initialisation (slots = random encoder features).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.trust_region import read_with_trust

ADDRESSING = ("topk", "shrink", "softmax")
SIMILARITY = ("cosine", "dot")


class MemoryReadout(NamedTuple):
    """What the memory returns for a ``(B, C, h, w)`` query with ``M`` slots."""

    read: Tensor  # (B, C, h, w): weighted sum of slots, the decoder's input
    weights: Tensor  # (B, h, w, M): sparse addressing weights, each location sums to 1 (or 0 after shrinkage)
    similarity: Tensor  # (B, h, w, M): cosine (or dot-product) similarity of each location to each slot


def hard_shrink(weights: Tensor, threshold: float, eps: float = 1e-12) -> Tensor:
    """MemAE hard shrinkage ``relu(w - lambda) * w / (|w - lambda| + eps)`` (Gong et al. 2019, Eq. 7).

    Weights below ``threshold`` become 0, the others stay (almost) unchanged; the form keeps a gradient.
    Not renormalised -- :func:`address` does that.
    """
    return F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)


def keep_topk(weights: Tensor, k: int, eps: float = 1e-12) -> Tensor:
    """Keep the ``k`` largest entries of each row of ``weights: (N, M)`` and renormalise them to sum 1."""
    values, index = weights.topk(k, dim=-1)  # (N, k)
    values = values / values.sum(-1, keepdim=True).clamp_min(eps)
    return torch.zeros_like(weights).scatter(-1, index, values)  # (N, M), <= k non-zeros per row


def similarity_to_slots(queries: Tensor, memory: Tensor, similarity: str = "cosine") -> Tensor:
    """Similarity of each query row to each slot: ``(N, C) x (M, C) -> (N, M)``."""
    if similarity == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(memory, dim=-1).T
    return queries @ memory.T


def address(
    queries: Tensor,
    memory: Tensor,
    *,
    similarity: str = "cosine",
    addressing: str = "topk",
    topk: int = 8,
    temperature: float = 0.1,
    shrink_threshold: float = 0.0025,
    eps: float = 1e-12,
    keep_grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Addressing weights of each query over the slots.

    Args:
        queries: ``(N, C)`` one row per spatial location.
        memory: ``(M, C)`` slots.
        similarity, addressing, topk, temperature, shrink_threshold, eps: see :class:`MemoryModule`.
        keep_grad: optional ``(N,)`` bool; rows where it is ``False`` compare with ``memory.detach()``, so
            their weights carry no gradient to the slots (trust-region reading, see
            :mod:`trustmae_lib.model.trust_region`).

    Returns:
        ``(weights (N, M), similarity (N, M))``.
    """
    sim = similarity_to_slots(queries, memory, similarity)  # (N, M)
    if keep_grad is not None:
        sim_detached = similarity_to_slots(queries, memory.detach(), similarity)
        sim = torch.where(keep_grad[:, None], sim, sim_detached)
    if addressing == "topk":
        # Softmax over the k most similar slots only: the same weights as a full softmax followed by
        # `keep_topk`, but the other slots get exactly zero gradient (a full softmax leaks ~1e-9 to them,
        # which Adam's normalisation would amplify into real updates).
        values, index = sim.topk(topk, dim=-1)  # (N, k)
        return torch.zeros_like(sim).scatter(-1, index, torch.softmax(values / temperature, dim=-1)), sim
    weights = torch.softmax(sim / temperature, dim=-1)  # (N, M)
    if addressing == "shrink":
        weights = F.normalize(hard_shrink(weights, shrink_threshold, eps), p=1, dim=-1, eps=eps)
    return weights, sim


def entropy_loss(weights: Tensor, eps: float = 1e-12) -> Tensor:
    """MemAE's entropy of the addressing weights: mean over locations of ``-sum_i w_i log(w_i + eps)``.

    Args:
        weights: ``(..., M)`` addressing weights (e.g. ``(B, h, w, M)``).

    Returns:
        scalar tensor.
    """
    return -(weights * torch.log(weights + eps)).sum(-1).mean()


class MemoryModule(nn.Module):
    """Memory of ``num_slots`` prototypes of dimension ``dim`` with sparse addressing.

    Args:
        num_slots: ``M``, number of slots.
        dim: ``C``, feature channels (512 at width 1).
        addressing: ``"topk"`` (default), ``"shrink"`` (MemAE) or ``"softmax"`` (dense).
        topk: slots kept per location for ``"topk"``.
        temperature: softmax temperature; 0.1 for cosine similarity, 1 for MemAE's dot product.
        shrink_threshold: ``lambda`` of MemAE hard shrinkage (their default 0.0025).
        eps: numerical floor (MemAE: 1e-12).
        similarity: ``"cosine"`` (default) or ``"dot"`` (MemAE).

    Example:
        >>> mem = MemoryModule(num_slots=16, dim=8, topk=4)
        >>> out = mem(torch.randn(2, 8, 3, 3))
        >>> out.read.shape, out.weights.shape
        (torch.Size([2, 8, 3, 3]), torch.Size([2, 3, 3, 16]))
    """

    def __init__(
        self,
        num_slots: int,
        dim: int,
        addressing: str = "topk",
        topk: int = 8,
        temperature: float = 0.1,
        shrink_threshold: float = 0.0025,
        eps: float = 1e-12,
        similarity: str = "cosine",
    ):
        super().__init__()
        if addressing not in ADDRESSING:
            raise TrustMAEError(f"unknown memory addressing '{addressing}'; use one of {', '.join(ADDRESSING)}")
        if similarity not in SIMILARITY:
            raise TrustMAEError(f"unknown memory similarity '{similarity}'; use one of {', '.join(SIMILARITY)}")
        if num_slots < 1 or dim < 1:
            raise TrustMAEError(f"memory needs num_slots >= 1 and dim >= 1, got {num_slots} and {dim}")
        if addressing == "topk" and not 1 <= topk <= num_slots:
            raise TrustMAEError(
                f"memory topk {topk} must be between 1 and num_slots ({num_slots}); "
                "lower memory_topk or raise memory_slots"
            )
        if temperature <= 0:
            raise TrustMAEError(f"memory temperature must be > 0, got {temperature}; use e.g. 0.1")
        self.num_slots, self.dim = num_slots, dim
        self.addressing, self.similarity = addressing, similarity
        self.topk, self.temperature = topk, temperature
        self.shrink_threshold, self.eps = shrink_threshold, eps
        bound = 1.0 / math.sqrt(dim)  # MemAE's reset_parameters
        self.memory = nn.Parameter(torch.empty(num_slots, dim).uniform_(-bound, bound))  # (M, C)

    @torch.no_grad()
    def init_from_features(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Set the slots to random feature vectors of ``z: (B, C, h, w)`` (with replacement if too few)."""
        rows = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B, C, h, w) -> (B*h*w, C)
        n = rows.shape[0]
        if n >= self.num_slots:
            pick = torch.randperm(n, generator=generator)[: self.num_slots]
        else:
            pick = torch.randint(n, (self.num_slots,), generator=generator)
        self.memory.copy_(rows[pick.to(rows.device)])

    def forward(self, z: Tensor, trusted: Tensor | None = None) -> MemoryReadout:
        """Address the memory at every location of ``z`` and read it out.

        Args:
            z: ``(B, C, h, w)`` encoder features.
            trusted: optional ``(B, h, w)`` bool. Where ``False`` the location addresses and reads
                ``memory.detach()``: it still reconstructs from the slots but cannot move them (trust-region
                reading, see :func:`trustmae_lib.model.trust_region.read_with_trust`).

        Returns:
            :class:`MemoryReadout` with ``read (B, C, h, w)``, ``weights (B, h, w, M)`` and
            ``similarity (B, h, w, M)``.
        """
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise TrustMAEError(
                f"memory expects features of shape (B, {self.dim}, h, w), got {tuple(z.shape)}; "
                "build the memory with dim equal to the encoder's channels"
            )
        b, c, h, w = z.shape
        queries = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B, C, h, w) -> (B*h*w, C)
        keep = None
        if trusted is not None:
            if trusted.shape != (b, h, w):
                raise TrustMAEError(f"trusted mask must have shape {(b, h, w)}, got {tuple(trusted.shape)}")
            keep = trusted.reshape(-1)  # (B*h*w,)
        weights, sim = address(
            queries,
            self.memory,
            similarity=self.similarity,
            addressing=self.addressing,
            topk=self.topk,
            temperature=self.temperature,
            shrink_threshold=self.shrink_threshold,
            eps=self.eps,
            keep_grad=keep,
        )  # (N, M) each
        weights = weights.reshape(b, h, w, -1)  # (N, M) -> (B, h, w, M)
        if trusted is None:
            read = (weights.reshape(-1, self.num_slots) @ self.memory).reshape(b, h, w, c)  # (N, M) @ (M, C)
            read = read.permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        else:
            read = read_with_trust(weights, self.memory, trusted)
        return MemoryReadout(read=read, weights=weights, similarity=sim.reshape(b, h, w, -1))

    @staticmethod
    def entropy_loss(weights: Tensor, eps: float = 1e-12) -> Tensor:
        """See :func:`entropy_loss`."""
        return entropy_loss(weights, eps)

    def extra_repr(self) -> str:
        extra = f"topk={self.topk}" if self.addressing == "topk" else f"threshold={self.shrink_threshold}"
        return (
            f"num_slots={self.num_slots}, dim={self.dim}, similarity={self.similarity}, "
            f"addressing={self.addressing}, {extra}, temperature={self.temperature}"
        )
