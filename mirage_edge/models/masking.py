"""Pretraining token sampling (ARCHITECTURE.md §7): Dirichlet shares, exactly K visible tokens."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch


def sample_task_masks(batch: int, counts: Mapping[str, int], num_encoded_tokens: int,
                      alphas: float | Sequence[float] = 1.0, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Masks modality -> B x N_m int64 (1 = masked) with exactly K visible tokens per sample.

    Per sample: shares p ~ Dirichlet(alphas) over the modalities (in `counts` order);
    n_t = round(p_t K) tokens of modality t drawn uniformly as visible; the concatenated mask plus
    U(0,1) noise is sorted and the first K kept, which fixes rounding so that sum n_t == K; the
    masks are rebuilt from the kept indices. Reproducible with `generator`.
    """
    names = list(counts)
    sizes = [int(counts[m]) for m in names]
    k = int(num_encoded_tokens)
    a = np.broadcast_to(np.asarray(alphas, dtype=np.float64), (len(names),))
    # torch's Dirichlet takes no generator; seed a NumPy one from the torch stream instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    shares = np.random.default_rng(seed).dirichlet(a, size=batch)  # B x T
    n_vis = torch.from_numpy(np.rint(shares * k).astype(np.int64))
    parts = []
    for t, n in enumerate(sizes):
        noise = torch.rand(batch, n, generator=generator)
        ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # uniform random permutation ranks
        parts.append((ranks >= n_vis[:, t : t + 1].clamp(max=n)).long())
    mask_all = torch.cat(parts, dim=1)
    noise = torch.rand(mask_all.shape, generator=generator)
    ids_keep = torch.argsort(mask_all.float() + noise, dim=1)[:, :k]
    mask_all = torch.ones_like(mask_all).scatter(1, ids_keep, 0)
    out, start = {}, 0
    for m, n in zip(names, sizes):
        out[m] = mask_all[:, start : start + n].to(device)
        start += n
    return out
