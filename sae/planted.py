"""A ground-truth benchmark: activations built from a known dictionary, shaped like a real residual stream.

`sae planted` writes such activations as an ordinary cache (the store's own writer), trains the configured SAEs on
it through the normal `sae train` path, and scores each against the dictionary it was built from: the mean over true
directions of the best cosine with any decoder row, the fraction recovered at cosine > 0.9, and L0 and FVU on fresh
rows, beside PCA at the SAE's L0 and a plain PyTorch TopK loop trained on the same batches.

The data has the properties that made the toolkit's defaults fail on real data while they passed on easy planted
data (issue 9): a constant offset much larger than the signal's spread (a residual stream's mean), feature
frequencies following a power law, groups of features that co-occur, log-normal magnitudes and a little noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

HOOK = "planted"
"""The hook name of the planted cache (its only one)."""


@dataclass
class PlantedData:
    """The generator's ground truth: draw rows with ``sample``."""

    dictionary: Tensor
    """True feature directions, unit rows [n_features, d_in]."""
    frequency: Tensor
    """Probability that each feature is active on a token [n_features] (a power law; sums to ``l0``)."""
    offset: Tensor
    """The constant vector added to every row [d_in]."""
    correlation: float
    group_size: int
    magnitude_sigma: float
    noise_std: float
    """Per-dimension std of the isotropic Gaussian noise."""

    def sample(self, n: int, generator: torch.Generator, chunk: int = 8192) -> Tensor:
        """n rows [n, d_in]: Σ_i a_i·m_i·D_i + offset + noise, drawn in chunks to bound memory."""
        return torch.cat([self._chunk(min(chunk, n - start), generator) for start in range(0, n, chunk)])

    def codes(self, n: int, generator: torch.Generator) -> Tensor:
        """Sparse non-negative feature activations [n, n_features].

        Whether feature i fires is a Gaussian copula: z_i = √ρ·g + √(1 − ρ)·e_i with g shared by the features of
        one group, and i fires when z_i exceeds its (1 − p_i) quantile, so each feature keeps its frequency p_i
        while features of a group co-occur (correlation ρ of the latent Gaussians). Magnitudes are log-normal,
        scaled to mean 1.
        """
        n_features = len(self.frequency)
        groups = math.ceil(n_features / self.group_size)
        shared = torch.randn(n, groups, generator=generator).repeat_interleave(self.group_size, 1)[:, :n_features]
        z = math.sqrt(self.correlation) * shared + math.sqrt(1 - self.correlation) * torch.randn(
            n, n_features, generator=generator)
        threshold = torch.distributions.Normal(0.0, 1.0).icdf(1 - self.frequency)
        s = self.magnitude_sigma
        magnitude = torch.exp(s * torch.randn(n, n_features, generator=generator) - s * s / 2)
        return (z > threshold) * magnitude

    def _chunk(self, n: int, generator: torch.Generator) -> Tensor:
        x = self.codes(n, generator) @ self.dictionary
        return x + self.offset + self.noise_std * torch.randn(x.shape, generator=generator)


def make_planted(d_in: int, n_features: int, l0: float, frequency_exponent: float, correlation: float,
                 group_size: int, magnitude_sigma: float, offset: float, noise: float, seed: int) -> PlantedData:
    """Draw a dictionary and its statistics. ``offset`` is ‖offset vector‖ in units of the signal's spread
    √E‖x − E x‖², ``noise`` the noise's share of that spread's energy (both measured on a sample)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    rank = torch.arange(1, n_features + 1, dtype=torch.float64)
    p = rank ** -frequency_exponent
    p = (p * l0 / p.sum()).clamp(max=1.0).float()
    p = p[torch.randperm(n_features, generator=g)]  # frequency unrelated to the group a feature is in
    data = PlantedData(dictionary, p, torch.zeros(d_in), correlation, group_size, magnitude_sigma, 0.0)
    signal = data.sample(8192, g)
    spread = (signal - signal.mean(0)).pow(2).sum(-1).mean().sqrt()
    data.offset = F.normalize(torch.randn(d_in, generator=g), dim=0) * offset * spread
    data.noise_std = float(spread * math.sqrt(noise / d_in))
    return data
