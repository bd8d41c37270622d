"""Class statistics of a feature space and what HiDe builds on them: the Gaussian statistics per
class, task-adaptive prediction (classifier alignment on pseudo-features sampled from them) and the contrastive
regularisation against the stored class centroids. Shared by every HiDe method (prompts, LoRA).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from divergence import check_loss
from utils import all_gather_rows, broadcast_tensors, log, warn

STORAGE_METHODS = ("covariance", "variance", "multi-centroid")
JITTER = 1e-4  # the reference's diagonal term: added to covariances, variances and centroid variances


class ClassStatistics(nn.Module):
    """Per class: K Gaussian components (mean, diagonal variance), K = --n_centroids for `multi-centroid`, else 1;
    `covariance` also keeps the full covariance. Buffers, so they travel with the task checkpoint."""

    def __init__(self, storage: str, num_classes: int, dim: int, n_centroids: int):
        super().__init__()
        if storage not in STORAGE_METHODS:
            raise ValueError(f"unknown storage method {storage!r}")
        self.storage, self.n_centroids = storage, n_centroids
        components = n_centroids if storage == "multi-centroid" else 1
        self.register_buffer("mean", torch.zeros(num_classes, components, dim))
        self.register_buffer("var", torch.zeros(num_classes, components, dim))  # what sampling adds to the mean
        self.register_buffer("present", torch.zeros(num_classes, components, dtype=torch.bool))
        if storage == "covariance":
            self.register_buffer("cov", torch.zeros(num_classes, dim, dim))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, classes: list[int], seed: int) -> None:
        """Statistics of `classes` from this rank's share of their features; every rank ends with the same values
        (features are gathered without duplicates; k-means is seeded per class)."""
        features, labels = all_gather_rows(features.float()), all_gather_rows(labels)
        for c in classes:
            x = features[labels == c]
            self.present[c] = False
            if x.shape[0] == 0:  # no training image of this class: nothing to model, nothing to sample
                continue
            if self.storage == "multi-centroid":
                self._centroids(c, x, seed + c)
                continue
            self.mean[c, 0], self.present[c, 0] = x.mean(0), True
            if self.storage == "variance":  # the reference keeps diag(cov + 1e-4 I) and samples with it as is
                self.var[c, 0] = x.var(0, unbiased=True) + JITTER
            else:
                self.cov[c] = torch.cov(x.T) + JITTER * torch.eye(x.shape[1], device=x.device)
                self.var[c, 0] = self.cov[c].diagonal()

    def _centroids(self, c: int, x: torch.Tensor, seed: int) -> None:
        from sklearn.cluster import KMeans  # noqa: PLC0415 (only HiDe needs scikit-learn's k-means)

        clusters = min(self.n_centroids, x.shape[0])
        # n_init=10 as scikit-learn 1.0 (the reference's) did by default; a fixed seed for identical ranks and runs
        assignment = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(x.cpu().numpy()).labels_
        assignment = torch.from_numpy(assignment).to(x.device)
        for k in range(clusters):
            members = x[assignment == k]
            if members.shape[0]:
                self.mean[c, k], self.var[c, k] = members.mean(0), members.var(0, unbiased=False)
                self.present[c, k] = True

    def prototypes(self) -> torch.Tensor:
        """Every stored mean (all centroids of every class with statistics): the contrastive term's anchors."""
        return self.mean[self.present]

    def sample(self, classes: list[int], per_component: int, count: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` pseudo-features drawn as the reference's TAP epoch uses them: `per_component` draws from each
        component of `classes`, shuffled, of which the first `count` are used. Only those are generated: a uniform
        choice of `count` of the draw slots, then mean + std x noise (a Cholesky factor only for full covariances).
        Components whose variance is all zero (single-member centroids) are skipped, as in the reference."""
        present = self.present[classes]
        if self.storage == "multi-centroid":
            present = present & (self.var[classes].mean(-1) != 0)
        class_pos, comp = present.nonzero(as_tuple=True)
        cls = torch.tensor(classes, device=self.mean.device)[class_pos]
        slots = cls.numel() * per_component
        pick = torch.randperm(slots, generator=generator)[: min(count, slots)].to(self.mean.device) // per_component
        cls, comp = cls[pick], comp[pick]
        noise = torch.randn(pick.numel(), self.mean.shape[-1], generator=generator).to(self.mean.device)
        mean = self.mean[cls, comp]
        if self.storage == "covariance":
            return self._add_correlated(mean, noise, cls), cls
        extra = JITTER if self.storage == "multi-centroid" else 0.0
        return mean + (self.var[cls, comp] + extra).sqrt() * noise, cls

    def _add_correlated(self, mean: torch.Tensor, noise: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """`mean` (one row per draw, updated in place) + L_c noise, L_c the Cholesky factor of the draw's class.

        Class by class, so memory grows with the classes, not the draws: gathering a factor per draw would hold
        draws x dim x dim floats (ImageNet-R's last task: 21,600 x 768 x 768, 47.5 GiB)."""
        classes, which = torch.unique(cls, sorted=True, return_inverse=True)
        factors = torch.linalg.cholesky(self.cov[classes])
        rows_of = torch.argsort(which, stable=True).split(torch.bincount(which, minlength=len(classes)).tolist())
        for factor, rows in zip(factors, rows_of, strict=True):
            mean[rows] += noise[rows] @ factor.T
        return mean


def task_adaptive_prediction(params: list[nn.Parameter], classify: Callable[[torch.Tensor], torch.Tensor],
                             stats: ClassStatistics, seen_classes: list[int], seen_mask: torch.Tensor,
                             iterations: int, per_component: int, epochs: int, lr: float, weight_decay: float,
                             seed: int, where: str = "task-adaptive prediction") -> list[float]:
    """Classifier alignment: SGD (momentum 0.9) with a cosine schedule over `epochs`; each epoch runs
    `iterations` steps of `per_component` pseudo-features, with the logits masked to the seen classes. Every rank
    runs the same seeded steps, then takes rank 0's values. Returns each epoch's mean loss; a non-finite one stops
    the run (`where` names the task and phase)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    blocked = ~seen_mask
    epoch_losses: list[float] = []
    for epoch in range(epochs):
        features, targets = stats.sample(seen_classes, per_component, iterations * per_component, generator)
        if features.shape[0] == 0:
            warn("task-adaptive prediction skipped: no class statistics with any spread to sample from (every "
                 "class has a single training image per centroid)")
            return epoch_losses
        losses = torch.zeros((), dtype=torch.float64, device=features.device)
        steps = 0
        for start in range(0, min(iterations * per_component, features.shape[0]), per_component):
            batch = slice(start, start + per_component)
            logits = classify(features[batch]).float().masked_fill(blocked, float("-inf"))
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses += loss.detach().double()
            steps += 1
        scheduler.step()
        epoch_losses.append(losses.item() / max(steps, 1))
        check_loss(epoch_losses[-1], "task-adaptive-prediction", f"{where}, alignment epoch {epoch + 1}/{epochs}",
                   "lower --ca_lr")
    broadcast_tensors([p.data for p in params])
    final = epoch_losses[-1] if epoch_losses else float("nan")
    log(f"task-adaptive prediction: {epochs} epochs x {iterations} steps x {per_component} pseudo-features, "
        f"final loss {final:.4f}")
    return epoch_losses


class ContrastiveRegularizer:
    """The reference's `orth_loss`: with M = [prototypes; batch features] and S = M M^T / 0.8,
    mean over the rows of M of (-S_ii + logsumexp_j S_ij), in float64, unnormalised features.

    The prototypes are constant within a task, so their block of S and its row-wise logsumexp are computed once
    (`set_prototypes`); a step then costs O(B (P + B) d) instead of O((P + B)^2 d)."""

    temperature = 0.8

    def __init__(self) -> None:
        self.prototypes: torch.Tensor | None = None
        self.prototype_lse: torch.Tensor | None = None  # logsumexp over the prototype columns of each prototype row
        self.prototype_diag: torch.Tensor | None = None

    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        if prototypes.shape[0] == 0:
            self.prototypes = self.prototype_lse = self.prototype_diag = None
            return
        self.prototypes = prototypes.detach().double()
        gram = self.prototypes @ self.prototypes.T / self.temperature
        self.prototype_lse, self.prototype_diag = torch.logsumexp(gram, dim=1), gram.diagonal().clone()

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        feats = features.double()
        batch_sim = feats @ feats.T / self.temperature
        if self.prototypes is None:
            return (torch.logsumexp(batch_sim, dim=1) - batch_sim.diagonal()).mean()
        cross = self.prototypes.to(feats.device) @ feats.T / self.temperature  # (P, B)
        prototype_rows = (torch.logaddexp(self.prototype_lse.to(feats.device), torch.logsumexp(cross, dim=1))
                          - self.prototype_diag.to(feats.device))
        batch_rows = torch.logsumexp(torch.cat([cross.T, batch_sim], dim=1), dim=1) - batch_sim.diagonal()
        return (prototype_rows.sum() + batch_rows.sum()) / (cross.shape[0] + cross.shape[1])
