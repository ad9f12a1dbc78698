"""Statistics of llama.cpp's perplexity tool, computed the same way (``tools/perplexity/perplexity.cpp``).

- :class:`MeanStat`: a mean and its uncertainty ``sqrt((E[x²] - E[x]²) / (n - 1))``.
- :class:`KLStats`: what ``llama-perplexity --kl-divergence`` reports for a quantized model Q against a base
  model: PPL(Q), PPL(base), ln(PPL(Q)/PPL(base)) with the covariance of the two, mean KL divergence
  ``KL(base || Q)`` per token with percentiles, "same top p" (the argmax agrees) and the RMS of Δp (the change
  in probability of the observed token), each with llama.cpp's uncertainty.

One deliberate difference: llama.cpp reads the base's log-probabilities back from a file where they are
stored as 16-bit integers and skips tokens with base probability below e^-16; here the base's logits are
computed in the same process window by window, so KL divergence sums every token in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# percentiles llama.cpp prints, as fractions
PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001)


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (llama.cpp subtracts the max and sums the exponentials in double)."""
    x = np.asarray(logits).astype(np.float64, copy=False)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def nll_of(logits: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood of each target under its logit row."""
    lp = log_softmax_rows(logits)
    return -lp[np.arange(len(targets)), np.asarray(targets)]


@dataclass
class MeanStat:
    """Running sum and sum of squares: mean and llama.cpp's uncertainty of the mean."""

    total: float = 0.0
    total2: float = 0.0
    count: int = 0

    def add(self, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.total += float(v.sum())
        self.total2 += float((v * v).sum())
        self.count += int(v.size)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def stderr(self) -> float:
        """sqrt((E[x²] - E[x]²) / (count - 1)); 0 when the variance is not positive (llama.cpp's rule)."""
        if self.count < 2:
            return 0.0
        var = self.total2 / self.count - self.mean ** 2
        return math.sqrt(var / (self.count - 1)) if var > 0 else 0.0


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at ``fraction * (n - 1)`` of the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - p) * sorted_values[i] + p * sorted_values[j])


def _ppl(stat: MeanStat) -> tuple[float, float]:
    ppl = math.exp(stat.mean)
    return ppl, ppl * stat.stderr


@dataclass
class KLStats:
    """KL divergence and friends of a model Q against a base, accumulated window by window."""

    nll: MeanStat = field(default_factory=MeanStat)
    nll_base: MeanStat = field(default_factory=MeanStat)
    nll_cross: float = 0.0  # sum of nll * nll_base (for the covariance)
    kld: MeanStat = field(default_factory=MeanStat)
    p_diff: MeanStat = field(default_factory=MeanStat)
    p_diff2: MeanStat = field(default_factory=MeanStat)  # of Δp², for RMS Δp and its uncertainty
    same_top: int = 0
    kld_values: list = field(default_factory=list)
    p_diff_values: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.kld.count

    def add(self, base_logits: np.ndarray, logits: np.ndarray, targets, block: int = 64) -> None:
        """Score one window: rows of the base's and Q's logits at the same positions, and the next tokens."""
        if base_logits.shape != logits.shape:
            raise ValueError(f"logit shapes differ: base {base_logits.shape}, model {logits.shape}")
        targets = np.asarray(targets)
        for s in range(0, len(targets), block):
            b, q, t = base_logits[s:s + block], logits[s:s + block], targets[s:s + block]
            rows = np.arange(len(t))
            lp_base = log_softmax_rows(b)
            lp = log_softmax_rows(q)
            kld = (np.exp(lp_base) * (lp_base - lp)).sum(axis=1)
            nll, nll_base = -lp[rows, t], -lp_base[rows, t]
            p_diff = np.exp(-nll) - np.exp(-nll_base)
            self.nll.add(nll)
            self.nll_base.add(nll_base)
            self.nll_cross += float((nll * nll_base).sum())
            self.kld.add(kld)
            self.p_diff.add(p_diff)
            self.p_diff2.add(p_diff * p_diff)
            self.same_top += int((np.argmax(q, axis=1) == np.argmax(b, axis=1)).sum())
            self.kld_values.append(kld.astype(np.float32))
            self.p_diff_values.append(p_diff.astype(np.float32))

    def _unc(self, stat: MeanStat) -> float:
        # llama.cpp's mean_and_uncertainty: 0 with 10 values or fewer
        return stat.stderr if stat.count > 10 else 0.0

    def summary(self) -> dict:
        """Everything ``llama-perplexity --kl-divergence`` prints, as numbers."""
        n = self.count
        if n == 0:
            raise ValueError("no tokens scored")
        ppl = math.exp(self.nll.mean)
        ppl_unc = ppl * self._unc(self.nll)
        ppl_base = math.exp(self.nll_base.mean)
        ppl_base_unc = ppl_base * self._unc(self.nll_base)
        cov = 0.0
        if n >= 10:
            cov = (self.nll_cross / n - self.nll.mean * self.nll_base.mean) / (n - 1)
        log_ratio = self.nll.mean - self.nll_base.mean
        log_ratio_unc = math.sqrt(max(0.0, self._unc(self.nll) ** 2 + self._unc(self.nll_base) ** 2 - 2 * cov))
        ratio = math.exp(log_ratio)
        kld = np.sort(np.concatenate(self.kld_values))
        p_diff = np.sort(np.concatenate(self.p_diff_values))
        rms = math.sqrt(max(self.p_diff2.mean, 0.0))
        rms_unc = 0.5 / rms * self._unc(self.p_diff2) if rms > 0 else 0.0
        same = self.same_top / n
        same_unc = math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0
        return {
            "tokens": n,
            "ppl": ppl, "ppl_stderr": ppl_unc,
            "ppl_base": ppl_base, "ppl_base_stderr": ppl_base_unc,
            "ln_ppl_ratio": log_ratio, "ln_ppl_ratio_stderr": log_ratio_unc,
            "ppl_ratio": ratio, "ppl_ratio_stderr": ratio * log_ratio_unc,
            "kld_mean": self.kld.mean, "kld_stderr": self._unc(self.kld),
            "kld_max": float(kld[-1]), "kld_min": float(kld[0]),
            "kld_percentiles": {f"{100 * f:g}": percentile(kld, f) for f in PERCENTILES},
            "same_top_p": same, "same_top_p_stderr": same_unc,
            "rms_dp": rms, "rms_dp_stderr": rms_unc,
            "mean_dp": self.p_diff.mean, "mean_dp_stderr": self._unc(self.p_diff),
            "dp_max": float(p_diff[-1]), "dp_min": float(p_diff[0]),
            "dp_percentiles": {f"{100 * f:g}": percentile(p_diff, f) for f in PERCENTILES},
        }
