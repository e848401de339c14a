"""`disagg plan`: the fewest GPUs that serve a workload within its SLO, by simulation.

A configuration meets the SLO when at least `target` (default 90%) of the trace's requests get
their first token within ttft and average at most tpot per later token (failed requests miss).
The search, for one GPU kind and model:

    colocated      --prefill 0 --decode d, TP t:            for each t, the smallest d
    disaggregated  --prefill p --decode d, TPs tp / td:     for each (tp, td) and p = 1, 2, ...,
                   the smallest d; p grows while p * tp alone is below the best total so far
    codecs         on NVLink the handoff is codec-bound and `none` wins, so the other codecs
                   are tried on the best disaggregated layouts only; on slower links every
                   layout tries every codec

"The smallest d" is a binary search between a capacity lower bound (prefill work and decode
token rate cannot exceed what d workers do at full batch) and the GPU budget, assuming more
decode workers never hurt (tests check that TPOT never rises with them). Every simulation
stops as soon as more than (1 - target) of the requests have missed, so hopeless layouts
cost little. Results are ranked by GPUs, then goodput per GPU.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

from disagg.sim.report import summarize
from disagg.sim.simulator import SimConfig, simulate

TPS = (1, 2, 4, 8)


@dataclass
class Candidate:
    prefill: int
    decode: int
    prefill_tp: int
    decode_tp: int
    codec: str
    gpus: int
    attainment: float
    goodput_per_gpu: float
    summary: dict

    @property
    def layout(self) -> str:
        if self.prefill == 0:
            return f"colocated {self.decode} x TP{self.decode_tp}"
        return f"{self.prefill}P x TP{self.prefill_tp} + {self.decode}D x TP{self.decode_tp}"


class Planner:
    def __init__(self, trace, base: SimConfig, model_for, slo: tuple[float, float], max_gpus: int,
                 target: float = 0.9, tps=TPS, codecs=("none", "fp8", "int8"), log=None):
        """model_for(tp) -> PerfModel for one worker of tp GPUs."""
        self.trace, self.base, self.model_for, self.slo = trace, base, model_for, slo
        self.max_gpus, self.target = max_gpus, target
        self.codecs = codecs
        self.models = {}
        self.tps = [t for t in tps if t <= max_gpus and self._model(t).num_kv_blocks(base.block_size) > 0]
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.results: dict[tuple, Candidate] = {}
        self.sims = 0

    def _model(self, tp: int):
        if tp not in self.models:
            self.models[tp] = self.model_for(tp)
        return self.models[tp]

    # ------------------------------------------------------------------ one configuration
    def evaluate(self, p: int, d: int, tp: int, td: int, codec: str) -> Candidate:
        key = (p, d, tp, td, codec)
        if key in self.results:
            return self.results[key]
        cfg = replace(self.base, num_prefill=p, num_decode=d, kv_codec=codec)
        n = len(self.trace)
        res = simulate(self.trace, cfg, self._model(td), self._model(tp) if p else None,
                       stop_after_violations=int((1 - self.target) * n), slo=self.slo)
        self.sims += 1
        s = summarize(res, self.slo)
        c = Candidate(p, d, tp if p else 0, td, codec, s["gpus"], s["slo_attainment"], s["goodput_per_gpu"], s)
        self.results[key] = c
        self.log(f"  {c.layout:<28} {codec:<5} {c.gpus:>3} GPUs: SLO met by {100 * c.attainment:5.1f}%"
                 + (" (stopped early)" if res.stopped_early else f", goodput/GPU {c.goodput_per_gpu:.3f} req/s"))
        return c

    def ok(self, c: Candidate) -> bool:
        return c.attainment >= self.target

    def _smallest_decode(self, p: int, tp: int, td: int, codec: str, budget: int) -> Candidate | None:
        """The fewest decode workers (of td GPUs) meeting the SLO within `budget` GPUs in all."""
        hi = (budget - p * tp) // td
        lo = max(1, self._decode_lower_bound(td, prefill_in_decode=p == 0))
        if hi < lo:
            return None
        best = None
        c = self.evaluate(p, hi, tp, td, codec)
        if not self.ok(c):
            return None
        best = c
        while lo < hi:                         # invariant: hi meets the SLO
            mid = (lo + hi) // 2
            c = self.evaluate(p, mid, tp, td, codec)
            if self.ok(c):
                hi, best = mid, c
            else:
                lo = mid + 1
        return best

    def _decode_lower_bound(self, td: int, prefill_in_decode: bool) -> int:
        """Workers needed at 100% utilisation at full batch: output tokens / s over the best
        token rate of one worker, plus the prefill work when it runs there too."""
        m, cfg, tr = self._model(td), self.base, self.trace
        span = max(tr[-1].arrival_s - tr[0].arrival_s, 1e-9)
        out_rate = sum(q.output_tokens for q in tr) / span
        ctx = sum(q.prompt_tokens + q.output_tokens / 2 for q in tr) / len(tr)
        b = max(1, min(cfg.max_num_seqs, m.num_kv_blocks(cfg.block_size) * cfg.block_size // max(int(ctx), 1)))
        need = out_rate * m.decode_time(b, b * ctx) / b
        if prefill_in_decode:
            need += sum(m.prefill_chunks_time([(q.prompt_tokens, 0)]) for q in tr[:2000]) / min(len(tr), 2000) \
                * len(tr) / span
        return max(1, math.floor(need))

    # ------------------------------------------------------------------ the search
    def search(self) -> list[Candidate]:
        best_total = self.max_gpus
        self.log("colocated:")
        for t in self.tps:
            c = self._smallest_decode(0, 0, t, "none", best_total)
            if c is not None:
                best_total = min(best_total, c.gpus)
        self.log("disaggregated:")
        nvlink = self._model(1).link.name == "nvlink"
        codecs = ("none",) if nvlink else self.codecs
        for tp in self.tps:
            for td in self.tps:
                for codec in codecs:
                    p = 1
                    while p * tp + td <= best_total:
                        c = self._smallest_decode(p, tp, td, codec, best_total)
                        if c is not None:
                            best_total = min(best_total, c.gpus)
                        p += 1
        if nvlink:
            top = sorted((c for c in self.results.values() if c.prefill and self.ok(c)),
                         key=lambda c: (c.gpus, -c.goodput_per_gpu))[:3]
            for c in top:
                for codec in self.codecs[1:]:
                    self.evaluate(c.prefill, c.decode, c.prefill_tp, c.decode_tp, codec)
        return self.ranked()

    def ranked(self) -> list[Candidate]:
        ok = [c for c in self.results.values() if self.ok(c)]
        return sorted(ok, key=lambda c: (c.gpus, -c.goodput_per_gpu, -c.attainment))


def format_plan(ranked: list[Candidate], top: int, slo, target: float, sims: int) -> str:
    lines = [f"Configurations meeting TTFT <= {slo[0] * 1e3:g} ms and TPOT <= {slo[1] * 1e3:g} ms for "
             f">= {100 * target:.0f}% of requests ({sims} simulations):", "",
             f"{'layout':<30}{'codec':<7}{'GPUs':>5}{'SLO met':>9}{'goodput/GPU':>13}{'TTFT p90':>10}"
             f"{'TPOT p90':>10}{'tok/s/GPU':>11}"]
    for c in ranked[:top]:
        s = c.summary
        lines.append(f"{c.layout:<30}{c.codec if c.prefill else '-':<7}{c.gpus:>5}{100 * c.attainment:>8.1f}%"
                     f"{c.goodput_per_gpu:>13.3f}{s['ttft_s']['p90'] * 1e3:>8.0f}ms{s['tpot_s']['p90'] * 1e3:>8.1f}ms"
                     f"{s['output_throughput'] / c.gpus:>11.0f}")
    if not ranked:
        lines.append("(none within the GPU budget: raise --max-gpus or relax the SLO)")
    return "\n".join(lines)
