"""Query whitening for the memory layers (`MemoryConfig.query_norm = "whiten"`, opt-in): it kept the
memory from collapsing under the old, too large value init; with the init fixed the paper's path
(no query statistics, the default) does not collapse and did better (docs/quality.md §3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model_workers.eval_cache import EvalCache, EvalCached


class BatchWhitening(EvalCached):
    """Query whitening over the batch's tokens (a generalisation of PKM's query batchnorm).

    Training: q [N, F] -> (q - μ) · L^-T with μ, Σ = L·Lᵀ the batch mean and (ε-regularized)
    covariance, gradient through both; the running μ, Σ (EMA) serve evaluation and decoding.
    Per-dimension batchnorm keeps the queries' correlations, and early in training they are nearly
    rank-1 (participation ratio ~2 of 64 on `small`), so the whole batch still picks the same slots.
    In eval the Cholesky factor of the running covariance is cached until the statistics change
    (model_workers/eval_cache.py): decoding reuses it every step.
    """

    def __init__(self, dim: int, momentum: float, eps: float = 1e-3) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_cov", torch.eye(dim))

    def _cholesky(self, cov: Tensor) -> Tensor:
        """cov [F, F] -> lower L [F, F] with L·Lᵀ = cov + ε·mean(diag)·I."""
        dim = cov.shape[0]
        reg = cov + (self.eps * cov.diagonal().mean() + 1e-8) * torch.eye(dim, dtype=cov.dtype, device=cov.device)
        return torch.linalg.cholesky(reg)

    @staticmethod
    def _whiten(q: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
        """q [N, F] -> (q - μ) · L^-T [N, F]."""
        centered = (q.to(chol.dtype) - mean).T  # (F, N)
        return torch.linalg.solve_triangular(chol, centered, upper=False).T.to(q.dtype)  # (N, F)

    def forward(self, q: Tensor) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):  # statistics and solve in fp32
            return self._forward(q)

    def _forward(self, q: Tensor) -> Tensor:
        if self.training and q.shape[0] > 1:
            qf = q.to(torch.promote_types(q.dtype, torch.float32))  # fp32 (fp64 in gradcheck)
            mean = qf.mean(0)
            cov = (qf - mean).T @ (qf - mean) / q.shape[0]
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_cov.lerp_(cov.detach().to(self.running_cov.dtype), self.momentum)
            return self._whiten(q, mean, self._cholesky(cov))
        dtype = torch.promote_types(q.dtype, self.running_cov.dtype)
        cov = self.running_cov
        if EvalCache.usable(self, (cov,)):  # decoding: the statistics are fixed between training steps
            chol = self.eval_cache.get(("chol", dtype), (cov,), lambda: self._cholesky(cov.to(dtype)))
        else:
            chol = self._cholesky(cov.to(dtype))
        return self._whiten(q, self.running_mean.to(dtype), chol)
