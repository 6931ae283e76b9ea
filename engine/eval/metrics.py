"""The figures eval reports, accumulated batch by batch: next-token distributions compared per token (KL divergence
of the output from the source, top-1 agreement, each model's negative log-likelihood of the sample's own next
token) and hidden states compared per layer (relative Frobenius error over the sample tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOGIT_CHUNK = 512  # positions whose vocabulary-wide float32 log-probabilities are held at once


@dataclass
class TokenMetrics:
    """Per-token KLD and top-1 over every sample token; NLL over the tokens that have a next token."""

    kld: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    tokens: int = 0
    nll_src: float = 0.0
    nll_out: float = 0.0
    targets: int = 0

    def add(self, logits_src: torch.Tensor, logits_out: torch.Tensor, input_ids: torch.Tensor,
            mask: torch.Tensor) -> None:
        """One sequence's logits [s, v] of both models (any dtype; compared in float32), its ids and mask [s]."""
        valid = mask.bool()
        nxt = torch.zeros_like(valid)
        nxt[:-1] = valid[1:] & valid[:-1]  # positions whose next token is a sample token
        for a in range(0, logits_src.shape[0], LOGIT_CHUNK):
            b = a + LOGIT_CHUNK
            v = valid[a:b]
            if not bool(v.any()):
                continue
            ls = torch.log_softmax(logits_src[a:b].float(), dim=-1)
            lo = torch.log_softmax(logits_out[a:b].float(), dim=-1)
            kld = (ls.exp() * (ls - lo)).sum(-1)
            self.kld.append(kld[v].cpu())
            self.agree += int((ls.argmax(-1) == lo.argmax(-1))[v].sum())
            self.tokens += int(v.sum())
            t = nxt[a:b]
            if bool(t.any()):
                tgt = input_ids[a + 1:b + 1].to(ls.device)
                tgt = torch.nn.functional.pad(tgt, (0, t.shape[0] - tgt.shape[0]))
                self.nll_src -= float(ls.gather(-1, tgt[:, None])[:, 0][t].double().sum())
                self.nll_out -= float(lo.gather(-1, tgt[:, None])[:, 0][t].double().sum())
                self.targets += int(t.sum())

    def summary(self) -> dict[str, float | int]:
        k = torch.cat(self.kld).double() if self.kld else torch.zeros(0, dtype=torch.float64)
        finite = bool(torch.isfinite(k).all()) if k.numel() else True
        return {
            "tokens": self.tokens,
            "kld_mean": float(k.mean()) if k.numel() else float("nan"),
            "kld_median": float(k.median()) if k.numel() else float("nan"),
            "kld_p99": float(torch.quantile(k, 0.99)) if k.numel() and finite else float("nan"),
            "kld_max": float(k.max()) if k.numel() else float("nan"),
            "top1_agree": self.agree / self.tokens if self.tokens else float("nan"),
            "ppl_source": _ppl(self.nll_src, self.targets),
            "ppl_output": _ppl(self.nll_out, self.targets),
            "ppl_tokens": self.targets,
        }


def _ppl(nll: float, n: int) -> float:
    if not n:
        return float("nan")
    try:
        return math.exp(nll / n)
    except OverflowError:
        return float("inf")


@dataclass
class HiddenError:
    """||a - b||² and ||b||² summed over the sample tokens of every batch (b the reference)."""

    diff2: float = 0.0
    ref2: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(a.device).bool()
        d = (a.float() - b.float())[m]
        r = b.float()[m]
        self.diff2 += float(d.double().pow(2).sum())
        self.ref2 += float(r.double().pow(2).sum())

    @property
    def rel(self) -> float:
        if self.ref2 == 0:
            return 0.0 if self.diff2 == 0 else float("inf")
        return math.sqrt(self.diff2 / self.ref2)
