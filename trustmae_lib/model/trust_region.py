"""Trust-region memory update (``L_trust``) and the separateness term ``L_margin`` of supplement Eq. 9.

*Reading* -- the supplement names both terms but the main paper's definitions are not in our source (chapter 4,
"Deviations and readings"). For each encoder feature ``z`` (detached) and its nearest slot ``m*`` (Euclidean,
``d = ||z - m*||``):

* ``d <= delta1`` (the *trust region*): the slot is **pulled** toward ``z`` -- loss ``d^2``
  (``pull="squared"``) or ``d`` (``pull="linear"``);
* ``delta1 < d <= delta2``: the slot is **pushed** away -- hinge ``relu(delta2 - d)``, so the push stops at
  ``delta2``;
* ``d > delta2``: the feature is ignored (too far to say anything about the slot).

Features are detached: ``L_trust`` moves only the slots. ``L_trust`` is the sum of the pull and push terms
over locations divided by the number of locations ``B*h*w``. With ``normalised=True`` (*reading*) distances are
measured relative to the batch's root-mean-square feature norm, so the pull is a relative squared distance and
``lambda_trust`` means the same at every width. With a memory whose slots learn by moving averages
(``slot_update="ema"``, :meth:`~trustmae_lib.model.memory.MemoryModule.ema_update`) the same regions drive the
update instead of a gradient: :meth:`TrustRegion.assign` returns them.

Radii ``delta1 = trust_radius`` and ``delta2 = outer_radius`` are running quantiles (default 80th and 98th
percentile) of recent nearest-slot distances. Each training batch's distance distribution is summarised by
``sketch_size`` evenly spaced quantiles and stored in a ring buffer of the last ``history`` batches (a
module buffer, so it lands in checkpoints; unused rows are NaN). While fewer than ``min_history`` batches are
recorded the radii are the exact quantiles of the current batch; afterwards they are the quantiles of the
pooled sketches (which include the current batch). Evaluation mode reads the buffer and never writes it. Under
``torch.distributed`` the sketches of all ranks are pooled so every rank uses the same radii. ``fixed_radii``
replaces all of this with constants.

Untrusted locations (``d > delta1``) may further read a *detached* copy of the memory
(:func:`read_with_trust`), so that -- as possibly defective features -- they cannot move the slots through the
reconstruction losses either.

``L_margin`` (*reading*, after the separateness loss of MNAD, Park et al. 2020): a triplet loss
``relu(d1 - d2 + margin)`` with the feature as anchor, its nearest slot as positive and its second-nearest
slot as negative, on L2-normalised vectors by default (the geometry of cosine addressing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trustmae_lib.errors import TrustMAEError

PULL = ("squared", "linear")
STAT_KEYS = (
    "trust_radius",
    "outer_radius",
    "frac_pulled",
    "frac_pushed",
    "frac_ignored",
    "mean_distance",
    "history_batches",
)


class Assignment(NamedTuple):
    """Each feature's nearest slot and trust-region band (:meth:`TrustRegion.assign`)."""

    rows: Tensor  # (N, C) detached features
    nearest: Tensor  # (N,) index of the Euclidean-nearest slot
    distance: Tensor  # (N,) distance to it (no gradient)
    inside: Tensor  # (N,) bool, d <= delta1: trusted, pulls its slot
    between: Tensor  # (N,) bool, delta1 < d <= delta2: pushes its slot away
    inner: Tensor  # () delta1
    outer: Tensor  # () delta2


def _rows(z: Tensor, memory: Tensor, what: str) -> Tensor:
    """Check shapes and flatten ``z: (B, C, h, w)`` to ``(B*h*w, C)``."""
    if z.dim() != 4 or memory.dim() != 2 or z.shape[1] != memory.shape[1]:
        raise TrustMAEError(
            f"{what} expects z (B, C, h, w) and memory (M, C) with the same C, got "
            f"{tuple(z.shape)} and {tuple(memory.shape)}; pass the encoder output and the slots"
        )
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, C, h, w) -> (B*h*w, C)


def nearest_slot(queries: Tensor, memory: Tensor) -> Tensor:
    """Index of the Euclidean-nearest slot for each row: ``(N, C), (M, C) -> (N,)`` long (no gradient)."""
    with torch.no_grad():
        return torch.cdist(queries.detach(), memory.detach()).argmin(dim=1)


def read_with_trust(readout_weights: Tensor, memory: Tensor, trusted: Tensor) -> Tensor:
    """Read-out ``weights @ memory`` where untrusted locations read ``memory.detach()``.

    The result equals the ordinary read-out; only the gradient differs: untrusted locations send no gradient
    to the slots (they still send it to their weights, i.e. to the encoder).

    Args:
        readout_weights: ``(B, h, w, M)`` addressing weights.
        memory: ``(M, C)`` slots.
        trusted: ``(B, h, w)`` bool, ``True`` inside the trust region.

    Returns:
        ``(B, C, h, w)`` read-out.
    """
    b, h, w, m = readout_weights.shape
    if memory.dim() != 2 or memory.shape[0] != m or trusted.shape != (b, h, w):
        raise TrustMAEError(
            f"read_with_trust expects weights (B, h, w, M), memory (M, C), trusted (B, h, w); "
            f"got {tuple(readout_weights.shape)}, {tuple(memory.shape)}, {tuple(trusted.shape)}"
        )
    weights = readout_weights.reshape(-1, m)  # (B, h, w, M) -> (N, M)
    keep = trusted.reshape(-1, 1)  # (N, 1)
    read = torch.where(keep, weights @ memory, weights @ memory.detach())  # (N, C)
    return read.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (N, C) -> (B, C, h, w)


def margin_loss(
    z: Tensor,
    memory: Tensor,
    margin: float = 1.0,
    space: str = "cosine",
    mask: Tensor | None = None,
    detach_features: bool = False,
) -> Tensor:
    """``L_margin``: triplet loss on each feature's nearest and second-nearest slot (MNAD separateness).

    ``relu(||a - p|| - ||a - n|| + margin)`` with anchor ``a`` = the feature, positive ``p`` = its nearest
    slot and negative ``n`` = its second-nearest slot (:func:`torch.nn.functional.triplet_margin_loss`). It
    pulls each feature and its slot together and keeps the two best slots apart, so that features commit to
    one prototype.

    Args:
        z: ``(B, C, h, w)`` features.
        memory: ``(M, C)`` slots, ``M >= 2``.
        margin: triplet margin (MNAD: 1.0 on unit vectors).
        space: ``"cosine"`` (features and slots L2-normalised first) or ``"euclidean"`` (raw vectors).
        mask: optional ``(B, h, w)`` bool; only these locations count (e.g. the trusted ones).
        detach_features: if ``True`` only the slots get gradients.

    Returns:
        scalar: mean over the (masked) locations; 0 (with a graph) when the mask is empty.
    """
    if space not in ("cosine", "euclidean"):
        raise TrustMAEError(f"unknown margin space '{space}'; use 'cosine' or 'euclidean'")
    queries = _rows(z, memory, "margin_loss")  # (N, C)
    if memory.shape[0] < 2:
        raise TrustMAEError("margin_loss needs at least 2 memory slots; raise memory_slots")
    if detach_features:
        queries = queries.detach()
    if space == "cosine":
        queries, memory = F.normalize(queries, dim=-1), F.normalize(memory, dim=-1)
    with torch.no_grad():
        two = torch.cdist(queries.detach(), memory.detach()).topk(2, dim=1, largest=False).indices  # (N, 2)
    per_row = F.triplet_margin_loss(
        queries, memory[two[:, 0]], memory[two[:, 1]], margin=margin, reduction="none"
    )  # (N,)
    if mask is None:
        return per_row.mean()
    keep = mask.reshape(-1).to(per_row.dtype)  # (N,)
    return (per_row * keep).sum() / keep.sum().clamp_min(1.0)


class TrustRegion(nn.Module):
    """``L_trust``: pull slots toward trusted features, push them from doubtful ones, ignore far ones.

    Args:
        inner_quantile: quantile of nearest-slot distances giving ``delta1`` (trust radius).
        outer_quantile: quantile giving ``delta2`` (outer radius).
        history: batches kept in the ring buffer of distance sketches.
        fixed_radii: ``(delta1, delta2)`` constants instead of running quantiles.
        pull: ``"squared"`` (``d^2``) or ``"linear"`` (``d``) pull inside the trust region.
        min_history: batches needed before the pooled history replaces the current batch's quantiles.
        sketch_size: quantiles stored per batch.
        sync_distributed: pool the sketches over ranks when ``torch.distributed`` is initialised.
        normalised: divide distances by the batch's root-mean-square feature norm in the loss (*reading*).

    Example:
        >>> tr = TrustRegion()
        >>> loss, stats = tr(torch.randn(2, 8, 4, 4), torch.randn(16, 8, requires_grad=True))
        >>> sorted(stats)[:3]
        ['frac_ignored', 'frac_pulled', 'frac_pushed']
    """

    def __init__(
        self,
        inner_quantile: float = 0.8,
        outer_quantile: float = 0.98,
        history: int = 32,
        fixed_radii: tuple[float, float] | None = None,
        pull: str = "squared",
        min_history: int = 4,
        sketch_size: int = 256,
        sync_distributed: bool = True,
        normalised: bool = False,
    ):
        super().__init__()
        if not 0.0 < inner_quantile <= outer_quantile <= 1.0:
            raise TrustMAEError(
                f"trust-region quantiles must satisfy 0 < inner <= outer <= 1, got "
                f"{inner_quantile} and {outer_quantile}; e.g. 0.8 and 0.98"
            )
        if fixed_radii is not None and not 0.0 <= fixed_radii[0] <= fixed_radii[1]:
            raise TrustMAEError(f"fixed_radii must be (delta1, delta2) with 0 <= delta1 <= delta2, got {fixed_radii}")
        if pull not in PULL:
            raise TrustMAEError(f"unknown pull '{pull}'; use one of {', '.join(PULL)}")
        if history < 1 or sketch_size < 2 or not 1 <= min_history <= history:
            raise TrustMAEError(
                f"trust-region history needs history >= 1, sketch_size >= 2 and "
                f"1 <= min_history <= history; got {history}, {sketch_size}, {min_history}"
            )
        self.inner_quantile, self.outer_quantile = inner_quantile, outer_quantile
        self.fixed_radii = None if fixed_radii is None else (float(fixed_radii[0]), float(fixed_radii[1]))
        self.pull, self.min_history, self.sync_distributed = pull, min_history, sync_distributed
        self.normalised = normalised
        # Ring buffer of per-batch distance sketches; NaN rows are unused.
        self.register_buffer("distance_history", torch.full((history, sketch_size), float("nan")))
        self.register_buffer("history_cursor", torch.zeros((), dtype=torch.long))
        self.register_buffer("history_count", torch.zeros((), dtype=torch.long))

    def _sketch(self, distances: Tensor) -> Tensor:
        """Evenly spaced quantiles of one batch's distances, pooled over ranks: ``(N,) -> (S,)``."""
        levels = torch.linspace(0, 1, self.distance_history.shape[1], device=distances.device)
        sketch = torch.quantile(distances.float(), levels)
        if self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(sketch) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, sketch)
            sketch = torch.quantile(torch.cat(gathered), levels)
        return sketch

    @torch.no_grad()
    def update_history(self, distances: Tensor) -> None:
        """Record one batch of nearest-slot distances ``(N,)`` in the ring buffer."""
        self.distance_history[self.history_cursor] = self._sketch(distances).to(self.distance_history.dtype)
        self.history_cursor.copy_((self.history_cursor + 1) % self.distance_history.shape[0])
        self.history_count.add_(1)

    @torch.no_grad()
    def radii(self, distances: Tensor) -> Tensor:
        """``(delta1, delta2)`` as a ``(2,)`` tensor for ``distances: (N,)`` (does not update the buffer)."""
        if self.fixed_radii is not None:
            return torch.tensor(self.fixed_radii, device=distances.device, dtype=distances.dtype)
        q = torch.tensor([self.inner_quantile, self.outer_quantile], device=distances.device)
        current = torch.quantile(distances.float(), q)
        pooled = torch.nanquantile(self.distance_history.flatten().float(), q)  # NaN rows = unused
        enough = self.history_count >= self.min_history
        return torch.where(enough, pooled, current).to(distances.dtype)

    def assign(self, z: Tensor, memory: Tensor) -> Assignment:
        """Nearest slot, distance and band of every location of ``z: (B, C, h, w)`` against ``memory: (M, C)``.

        In training mode this records the batch's distances in the history (once per call), so call it once per
        step: :meth:`forward` calls it.
        """
        rows = _rows(z, memory, "TrustRegion").detach()  # (N, C), no gradient to the encoder
        idx = nearest_slot(rows, memory)  # (N,)
        with torch.no_grad():
            d = (rows - memory[idx].detach()).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()  # (N,)
        if self.training and self.fixed_radii is None:
            self.update_history(d)
        radii = self.radii(d)
        inner, outer = radii[0], radii[1]
        inside = d <= inner  # pulled
        between = (d > inner) & (d <= outer)  # pushed
        return Assignment(rows, idx, d, inside, between, inner, outer)

    def forward(self, z: Tensor, memory: Tensor, return_trusted: bool = False, return_assignment: bool = False):
        """Trust-region loss of features ``z`` against ``memory``.

        Args:
            z: ``(B, C, h, w)`` features (detached here; they get no gradient).
            memory: ``(M, C)`` slots (they get the gradient).
            return_trusted: also return the ``(B, h, w)`` bool mask ``d <= delta1``.
            return_assignment: also return the :class:`Assignment` (after the mask).

        Returns:
            ``(loss, stats)``, ``(loss, stats, trusted)`` or with the assignment last: scalar loss, a dict of floats
            (:data:`STAT_KEYS`: radii, fractions pulled/pushed/ignored, mean nearest-slot distance, recorded
            batches).
        """
        a = self.assign(z, memory)
        inside, between, inner, outer, d_value = a.inside, a.between, a.inner, a.outer, a.distance
        squared = (a.rows - memory[a.nearest]).pow(2).sum(dim=1)  # (N,) d^2, gradient to the chosen slots only
        d = squared.clamp_min(1e-12).sqrt()
        if self.normalised:  # distances relative to the batch's RMS feature norm (no gradient through it)
            scale = a.rows.pow(2).sum(dim=1).mean().clamp_min(1e-12).sqrt()
            squared, d, outer_l = squared / scale**2, d / scale, outer / scale
        else:
            outer_l = outer
        pull = squared if self.pull == "squared" else d
        # L_trust: pull inside delta1, hinge push up to delta2, nothing beyond; mean over all locations.
        loss = (torch.where(inside, pull, 0.0) + torch.where(between, F.relu(outer_l - d), 0.0)).mean()
        n = float(d_value.numel())
        numbers = torch.stack(
            [
                inner.float(),
                outer.float(),
                inside.sum() / n,
                between.sum() / n,
                (~(inside | between)).sum() / n,
                d_value.float().mean(),
                self.history_count.float(),
            ]
        ).tolist()  # one device synchronisation for all stats
        stats = dict(zip(STAT_KEYS, numbers, strict=True))
        extra = []
        if return_trusted:
            b, _, h, w = z.shape
            extra.append(inside.reshape(b, h, w))
        if return_assignment:
            extra.append(a)
        return (loss, stats, *extra)

    def extra_repr(self) -> str:
        if self.fixed_radii is not None:
            return f"fixed_radii={self.fixed_radii}, pull={self.pull}"
        norm = ", normalised=True" if self.normalised else ""
        return (
            f"inner_quantile={self.inner_quantile}, outer_quantile={self.outer_quantile}, "
            f"history={self.distance_history.shape[0]}, min_history={self.min_history}, pull={self.pull}{norm}"
        )
