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
:meth:`MemoryModule.init_from_features` offers a data initialisation (slots = random encoder features) and
:meth:`MemoryModule.init_kmeans` one from the whole training set (k-means centroids of its features).

How the slots learn (``slot_update``):

* ``"gradient"`` -- the slots are parameters and follow the optimiser (Adam) on every loss that reaches them.
  At the book's scale this barely moves them: Adam moves a coordinate by about ``lr`` per step, the slots'
  coordinates are of order 1, so 300 steps move them about 1 % of their size (chapter 4 measures it).
* ``"ema"`` -- *reading*: the slots are not optimised by gradients; :meth:`MemoryModule.ema_update` moves each slot
  to an exponential moving average of the features assigned to it (online k-means, as the codebook of VQ-VAE with
  EMA updates, van den Oord et al. 2017), only from the features the trust region trusts, pushes slots away from
  the features in its doubt band, and restarts slots that no feature uses any more. This is the closed-form
  minimiser of the trust region's pull term that gradient steps approach only slowly.
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
SLOT_UPDATE = ("gradient", "ema")


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
        slot_update: ``"gradient"`` (default: the slots are optimised parameters) or ``"ema"`` (moving averages of
            the trusted features, :meth:`ema_update`; the slots then get no gradient).
        ema_decay: decay of the ``"ema"`` update (a slot moves ``1 - ema_decay`` of the way to its features' mean).
        dead_fraction: with ``"ema"``, a slot whose running share of assigned features falls below this fraction of
            the mean share is restarted at a random trusted feature of the batch.

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
        slot_update: str = "gradient",
        ema_decay: float = 0.95,
        dead_fraction: float = 0.03,
    ):
        super().__init__()
        if slot_update not in SLOT_UPDATE:
            raise TrustMAEError(f"unknown slot update '{slot_update}'; use one of {', '.join(SLOT_UPDATE)}")
        if not 0.0 <= ema_decay < 1.0 or not 0.0 <= dead_fraction < 1.0:
            raise TrustMAEError(f"ema_decay and dead_fraction must be in [0, 1), got {ema_decay} and {dead_fraction}")
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
        self.slot_update, self.ema_decay, self.dead_fraction = slot_update, ema_decay, dead_fraction
        if slot_update == "ema":
            self.memory.requires_grad_(False)  # moved by ema_update, not by the optimiser
            # Running number of features assigned to each slot per batch; NaN until the first update.
            self.register_buffer("usage", torch.full((num_slots,), float("nan")))
            self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

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

    @torch.no_grad()
    def init_kmeans(self, rows: Tensor, seed: int = 0) -> None:
        """Set the slots to the k-means centroids of feature rows ``(N, C)`` (scikit-learn, one seeded k-means++
        start); with fewer rows than slots, to random rows (:meth:`init_from_features`)."""
        if rows.shape[0] <= self.num_slots:
            self.init_from_features(rows.reshape(rows.shape[0], self.dim, 1, 1),
                                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
            return
        from sklearn.cluster import KMeans

        data = rows.detach().double().cpu().numpy()
        km = KMeans(n_clusters=self.num_slots, n_init=1, max_iter=100, random_state=seed).fit(data)
        self.memory.copy_(torch.from_numpy(km.cluster_centers_).to(self.memory))

    @torch.no_grad()
    def ema_update(self, rows: Tensor, nearest: Tensor, pull: Tensor, push: Tensor | None = None,
                   push_scale: Tensor | None = None) -> dict[str, float]:  # fmt: skip
        """One ``"ema"`` step of the slots (*reading*, see the module): online k-means over the trusted features.

        Every slot with pulled features this batch moves ``1 - ema_decay`` of the way to their mean; every slot
        with features in the doubt band moves away from them by ``1 - ema_decay`` times ``push_scale`` times the
        mean of ``(m - z)`` (the push of the trust region's hinge, see
        :class:`~trustmae_lib.model.trust_region.TrustRegion`); slots whose running use falls below
        ``dead_fraction`` of the average are restarted at random pulled features. Under ``torch.distributed`` the
        sums are pooled over ranks, so every rank keeps the same slots (and no slot is restarted).

        Args:
            rows: ``(N, C)`` features (detached).
            nearest: ``(N,)`` index of each row's nearest slot.
            pull: ``(N,)`` bool, rows inside the trust region.
            push: optional ``(N,)`` bool, rows in the doubt band.
            push_scale: ``(N,)`` push strength per row (``(delta2 - d) / d`` for the hinge), with ``push``.

        Returns:
            ``{"slots_pulled", "slots_pushed", "slots_restarted"}`` of this step.
        """
        if self.slot_update != "ema":
            raise TrustMAEError("ema_update needs a memory built with slot_update='ema'")
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rows = rows.detach().to(self.memory.dtype)
        m, rate = self.num_slots, 1.0 - self.ema_decay
        weight = pull.to(rows.dtype)  # (N,)
        counts = torch.zeros(m, dtype=rows.dtype, device=rows.device).index_add_(0, nearest, weight)  # (M,)
        sums = torch.zeros_like(self.memory).index_add_(0, nearest, rows * weight[:, None])  # (M, C)
        push_counts = torch.zeros_like(counts)
        push_sums = torch.zeros_like(sums)
        if push is not None:
            pw = push.to(rows.dtype) * (push_scale if push_scale is not None else 1.0)  # (N,)
            push_counts.index_add_(0, nearest, push.to(rows.dtype))
            # sum over pushed rows of scale * (m - z) = scale * m - scale * z, accumulated per slot
            push_sums.index_add_(0, nearest, pw[:, None] * (self.memory[nearest] - rows))
        if distributed:
            for t in (counts, sums, push_counts, push_sums):
                dist.all_reduce(t)
        pulled = counts > 0
        target = sums / counts.clamp_min(1.0)[:, None]  # (M, C) mean pulled feature per slot
        self.memory[pulled] += rate * (target[pulled] - self.memory[pulled])
        pushed = push_counts > 0
        self.memory[pushed] += rate * push_sums[pushed] / push_counts[pushed][:, None]
        # Running use per slot; dead slots restart at random pulled features (seeded by the global RNG).
        if torch.isnan(self.usage).any():
            self.usage.fill_(float(counts.sum()) / m)
        else:
            self.usage.mul_(self.ema_decay).add_(counts, alpha=rate)
        dead = self.usage < self.dead_fraction * self.usage.mean()
        candidates = pull.nonzero().squeeze(1)
        # ranks hold different features: no restarts under DDP, so that their slots stay the same
        n_restart = 0 if distributed else min(int(dead.sum()), int(candidates.numel()))
        if n_restart:
            slots = dead.nonzero().squeeze(1)[:n_restart]
            pick = candidates[torch.randperm(candidates.numel(), device=candidates.device)[:n_restart]]
            self.memory[slots] = rows[pick]
            self.usage[slots] = self.usage.mean()
            self.restarts.add_(n_restart)
        return {"slots_pulled": float(pulled.sum()), "slots_pushed": float(pushed.sum()),
                "slots_restarted": float(n_restart)}  # fmt: skip

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
        update = f", slot_update=ema, ema_decay={self.ema_decay}" if self.slot_update == "ema" else ""
        return (
            f"num_slots={self.num_slots}, dim={self.dim}, similarity={self.similarity}, "
            f"addressing={self.addressing}, {extra}, temperature={self.temperature}{update}"
        )
