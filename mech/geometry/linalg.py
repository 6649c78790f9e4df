"""Spectra and subspaces: singular values, effective ranks, norms, principal angles and subspace overlap.

Conventions (every function takes float tensors and returns float32 CPU results):
- an update ``M`` is summarised by its thin SVD ``M = U diag(S) Vᵀ`` with ``S`` descending; ``U`` spans what it
  writes (output space), ``V`` what it reads (input space);
- *effective rank* (Roy & Vetterli 2007) is ``exp(H(p))`` with ``p = S / ΣS``; the *participation ratio* is
  ``(ΣS²)² / ΣS⁴``; the *stable rank* is ``ΣS² / S₁²``. All three equal r for r equal non-zero singular values;
- the *overlap* of two subspaces with orthonormal bases ``U`` [d, k1] and ``W`` [d, k2] is the mean squared
  cosine of their principal angles, ``‖UᵀW‖_F² / min(k1, k2)``: 1 when one contains the other, 0 when
  orthogonal, and ``max(k1, k2) / d`` in expectation for a uniformly random subspace (:func:`chance_overlap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mech.errors import MechError

# Singular values below this fraction of the largest count as zero (float32 round-off of a low-rank product).
RANK_TOL = 1e-5


@dataclass(frozen=True)
class Spectrum:
    """A thin SVD: ``U`` [out, k], ``S`` [k] descending, ``V`` [in, k]; ``U diag(S) Vᵀ`` is the matrix."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def matrix(self, keep: slice = slice(None)) -> torch.Tensor:
        return (self.U[:, keep] * self.S[keep]) @ self.V[:, keep].T

    def rank(self, tol: float = RANK_TOL) -> int:
        return numerical_rank(self.S, tol)


def _finite(m: torch.Tensor, what: str) -> torch.Tensor:
    m = m.detach().float().cpu()
    if not torch.isfinite(m).all():
        raise MechError(f"{what} has non-finite entries: the student's weights are broken; retrain it")
    return m


def svd(m: torch.Tensor) -> Spectrum:
    """Thin SVD of a matrix [out, in], or of a stack [..., out, in] (batched: one LAPACK call)."""
    m = _finite(m, "the matrix")
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return Spectrum(U, S, Vh.transpose(-1, -2))


def svd_stack(mats: list[torch.Tensor]) -> list[Spectrum]:
    """SVDs of many matrices, batched over those of one shape (the cost is in the LAPACK calls, not Python)."""
    out: list[Spectrum | None] = [None] * len(mats)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for idx in by_shape.values():
        s = svd(torch.stack([mats[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = Spectrum(s.U[j], s.S[j], s.V[j])
    return out  # type: ignore[return-value]


def low_rank_svd(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> Spectrum:
    """Thin SVD of ``scaling · B @ A`` (B [out, r], A [r, in]) through the r × r core, never forming the matrix:
    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, so ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and only the core is decomposed."""
    A, B = _finite(A, "LoRA A"), _finite(B, "LoRA B")
    if A.shape[0] != B.shape[1]:
        raise MechError(f"LoRA factors do not chain: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    core = svd(scaling * rb @ ra.T)
    return Spectrum(qb @ core.U, core.S, qa @ core.V)


# --------------------------------------------------------------------------------------------- ranks, norms


def numerical_rank(S: torch.Tensor, tol: float = RANK_TOL) -> int:
    top = float(S.max()) if S.numel() else 0.0
    return int((S > tol * top).sum()) if top > 0 else 0


def effective_rank(S: torch.Tensor) -> float:
    """exp of the Shannon entropy of ``S / ΣS`` (Roy & Vetterli); 0 for a zero matrix."""
    s = S.double().clamp(min=0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(S: torch.Tensor) -> float:
    s2 = S.double() ** 2
    denom = float((s2 ** 2).sum())
    return float(s2.sum()) ** 2 / denom if denom > 0 else 0.0


def stable_rank(S: torch.Tensor) -> float:
    s2 = S.double() ** 2
    top = float(s2.max()) if s2.numel() else 0.0
    return float(s2.sum()) / top if top > 0 else 0.0


def spectrum_stats(S: torch.Tensor) -> dict[str, float]:
    """The per-matrix numbers every geometry table carries."""
    return {"fro": float(S.double().pow(2).sum().sqrt()), "spectral": float(S.max()) if S.numel() else 0.0,
            "numerical_rank": numerical_rank(S), "effective_rank": effective_rank(S),
            "participation_ratio": participation_ratio(S), "stable_rank": stable_rank(S)}


# --------------------------------------------------------------------------------------------- truncation


def check_k(k: int, available: int, what: str = "the update") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise MechError(f"k must be an integer >= 0, got {k!r}")
    if k > available:
        raise MechError(f"k = {k} is larger than the rank of {what} ({available}): choose k <= {available}")
    return k


def truncated(spec: Spectrum, k: int) -> torch.Tensor:
    """The best rank-k approximation (top-k singular directions kept)."""
    return spec.matrix(slice(0, check_k(k, int(spec.S.numel()))))


def top_removed(spec: Spectrum, k: int) -> torch.Tensor:
    """The matrix with its top-k singular directions removed."""
    return spec.matrix(slice(check_k(k, int(spec.S.numel())), None))


# --------------------------------------------------------------------------------------------- subspaces


def orthonormal(X: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [d, k] of the column space of X [d, k] (full column rank assumed)."""
    q, _ = torch.linalg.qr(X.float())
    return q


def principal_cosines(U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(U) and span(W) (orthonormal columns), descending."""
    if U.shape[0] != W.shape[0]:
        raise MechError(f"subspaces live in different spaces ({U.shape[0]} vs {W.shape[0]} dims): compare "
                        "modules of the same shape")
    return torch.linalg.svdvals(U.T.float() @ W.float()).clamp(max=1.0)


def overlap(U: torch.Tensor, W: torch.Tensor) -> float:
    """Mean squared principal cosine, ``‖UᵀW‖_F² / min(k1, k2)``, in [0, 1]."""
    k = min(U.shape[1], W.shape[1])
    if k == 0:
        raise MechError("cannot compare an empty subspace: k must be >= 1")
    return float((U.T.float() @ W.float()).pow(2).sum()) / k


def chance_overlap(d: int, k1: int, k2: int) -> float:
    """E[overlap] of a fixed k1-subspace and a uniformly random k2-subspace of R^d: ``max(k1, k2) / d``."""
    return min(1.0, max(k1, k2) / d)


def random_subspace(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random k-dimensional subspace of R^d (QR of a Gaussian matrix), seeded by ``generator``."""
    return orthonormal(torch.randn(d, k, generator=generator))


def random_directions(d: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` uniformly random unit vectors [n, d]."""
    x = torch.randn(n, d, generator=generator)
    return x / x.norm(dim=-1, keepdim=True)


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().float().cpu()
    n = float(v.norm())
    if not math.isfinite(n) or n == 0:
        raise MechError("cannot normalise a zero or non-finite direction")
    return v / n


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu().flatten(), b.detach().float().cpu().flatten()
    if a.shape != b.shape:
        raise MechError(f"vectors of different widths ({a.numel()} vs {b.numel()}): compare directions of one model")
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def captured(U: torch.Tensor, v: torch.Tensor) -> float:
    """The share of a direction's energy inside span(U) (orthonormal): ``‖Uᵀ v̂‖²``, in [0, 1]."""
    if U.shape[0] != v.numel():
        raise MechError(f"direction of width {v.numel()} does not fit a {U.shape[0]}-dim space")
    return float((U.T.float() @ unit(v)).pow(2).sum())
