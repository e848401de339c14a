"""The performance model from measured tables: a profile written by `disagg profile`.

The step rule and the analytic model it shares an interface with are in disagg/sim/perf_model.py;
the profile's JSON in disagg/sim/profile.py's docstring.
"""
from __future__ import annotations

import bisect
import json
import statistics

from disagg.config import ModelConfig
from disagg.sim.gpus import LinkSpec, gpu
from disagg.sim.perf_model import DEFAULT_RATIO, FORMAT, PerfModel, RooflineModel, Shape, _lerp


class ProfileModel(PerfModel):
    """Tables from `disagg profile`. Missing decode cells (batch x context beyond the KV cache)
    are extrapolated linearly in context from their row (see _fill_decode)."""
    source = "profile"

    def __init__(self, prof: dict, tp: int = 1, link_kind: str | None = None):
        if prof.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} profile (format={prof.get('format')!r})")
        mc = ModelConfig.from_hf_dict(prof["model"]["config"], name=prof["model"]["name"])
        super().__init__(Shape.of(mc), gpu(prof["gpu"]), tp, link_kind or prof.get("link", {}).get("kind", "nvlink"))
        self.prof = prof
        d = prof["decode"]
        self.d_b = [float(b) for b in d["batch"]]
        self.d_c = [float(c) for c in d["context"]]
        self.d_rows = self._fill_decode(self.d_b, self.d_c, d["seconds"])
        self._c0 = self.d_c[0]
        self.graph_sizes = sorted(d.get("graph_sizes") or [])
        p = prof["prefill"]
        self.p_n = [float(n) for n in p["tokens"]]
        self.p_c = [float(c) for c in p["context"]]
        cols = [self._fill_row(self.p_n, [row[j] for row in p["seconds"]]) for j in range(len(self.p_c))]
        self.p_cols = cols                             # per context: seconds over tokens
        self.p_buckets = sorted(int(x) for x in p.get("buckets") or [])
        self.per_prompt_s = float(prof.get("per_prompt_s", 0.0))
        md = prof.get("mixed_decode") or {}
        groups: dict[float, list[tuple[float, float]]] = {}     # chunk tokens -> [(batch, extra)]
        batch = md.get("batch", [])
        for b, n, x in zip(batch, md.get("prefill_tokens") or [64] * len(batch), md.get("extra_s", [])):
            groups.setdefault(float(n), []).append((float(b), float(x)))
        self.mx_lines = [(n, self._robust_line(pts)) for n, pts in sorted(groups.items())]
        st = prof.get("decode_straggler") or {}
        self.st_b = [float(x) for x in st.get("batch", [])]
        self.st_m = [float(x) for x in st.get("max_context", [])]
        self.st_rows = [[max(0.0, float(x)) for x in row] for row in st.get("extra_s", [])]
        self.st_base = float(st.get("base_context", 0.0))
        h = prof.get("host", {})
        self.sched_s = float(h.get("sched_s", PerfModel.sched_s))
        self.sched_seq_s = float(h.get("sched_seq_s", PerfModel.sched_seq_s))
        self.chunk_s = float(h.get("chunk_s", 0.0))
        self.chunk_token_s = float(h.get("chunk_token_s", 0.0))
        lk = prof.get("link")
        if lk and link_kind in (None, lk.get("kind")):
            self.link = LinkSpec(lk["kind"], float(lk["bytes_per_s"]), float(lk["latency_s"]))
        self._roof = RooflineModel(mc, prof["gpu"], 1, self.link.name)

    @classmethod
    def _fill_decode(cls, bs: list[float], cs: list[float], rows: list[list]) -> list[list[float]]:
        """A row measured at one context only (big batches: the longer ones did not fit) takes its
        slope from the row before, as a cost per KV token (the same attention kernel reads them)."""
        out, per_kv = [], None
        for b, row in zip(bs, rows):
            pts = [(c, y) for c, y in zip(cs, row) if y is not None]
            if len(pts) == 1 and per_kv is not None:
                c0, y0 = pts[0]
                out.append([y if y is not None else y0 + per_kv * b * (c - c0) for c, y in zip(cs, row)])
                continue
            out.append(cls._fill_row(cs, row))
            if len(pts) >= 2:
                per_kv = (pts[-1][1] - pts[0][1]) / ((pts[-1][0] - pts[0][0]) * b)
        return out

    @staticmethod
    def _fill_row(xs: list[float], row: list) -> list[float]:
        pts = [(x, y) for x, y in zip(xs, row) if y is not None]
        if not pts:
            raise ValueError("a profile row has no measurement")
        if len(pts) == 1:
            return [pts[0][1]] * len(xs)
        px, py = [p[0] for p in pts], [p[1] for p in pts]
        return [y if y is not None else _lerp(px, py, x) for x, y in zip(xs, row)]

    def _decode_line(self, b: int) -> tuple[list[float], list[float]]:
        """The measured rows (per-request context c) interpolated at batch b, as k = b * c. A
        batch that the runner pads up to a captured CUDA graph (padding rows attend to nothing)
        costs that graph's row at the same KV tokens."""
        g = self.graph_sizes
        if g and b <= g[-1]:
            b = g[bisect.bisect_left(g, b)]
        xs = [b * c for c in self.d_c]
        if b <= self.d_b[0] or len(self.d_b) == 1:
            return xs, list(self.d_rows[0])
        i = min(bisect.bisect_right(self.d_b, b) - 1, len(self.d_b) - 2)
        f = (b - self.d_b[i]) / (self.d_b[i + 1] - self.d_b[i])
        return xs, [y0 + (y1 - y0) * f for y0, y1 in zip(self.d_rows[i], self.d_rows[i + 1])]

    def _prefill(self, n: int, c: float) -> float:
        """Linear in the context (attention reads c more keys per query), extrapolated below 0 for
        batches of several prompts, whose attention is less than one prompt of n tokens has."""
        ys = [_lerp(self.p_n, col, n) for col in self.p_cols]
        return max(_lerp(self.p_c, ys, c, clamp_low=False), 0.5 * ys[0])

    def _straggler(self, b: int, k: float, maxc: int) -> float:
        """The measured table over (batch, longest context) against a 1,024-token rest, bilinear,
        flat past its batches; relative to the batch's mean context (an equal-context batch
        pays nothing beyond the tables)."""
        if not self.st_rows or b < 2 or maxc <= self.st_base:
            return 0.0
        xs = [self.st_base] + self.st_m
        ys = [0.0] + [_lerp(self.st_b, [row[j] for row in self.st_rows], b) for j in range(len(self.st_m))]

        def at(m: float) -> float:
            return 0.0 if m <= self.st_base else _lerp(xs, ys, min(m, xs[-1]))
        return max(0.0, at(maxc) - at(k / b))

    def _bucket(self, n: int) -> int:
        g = self.p_buckets
        return g[bisect.bisect_left(g, n)] if g and n <= g[-1] else n

    @staticmethod
    def _robust_line(pts: list[tuple[float, float]]) -> tuple[float, float]:
        """(intercept, slope) through the points, robustly: single measurements jitter by
        milliseconds on some hosts (one point 2-3x the others), so the slope is the median of the
        pairwise slopes (Theil-Sen, never negative: a decode does not make a step cheaper) and the
        intercept the median residual."""
        slopes = sorted((y1 - y0) / (x1 - x0) for i, (x0, y0) in enumerate(pts) for x1, y1 in pts[i + 1:]
                        if x1 != x0)
        slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
        return statistics.median(y - slope * x for x, y in pts), slope

    def _mixed_extra(self, b: int, tokens: int = 0) -> float:
        """The measured extras, a line in the batch per measured chunk length (a launch cost per
        step plus a little per decode, which a long chunk's GPU work partly hides), linear between
        the chunk lengths and flat past them; never negative."""
        lines = self.mx_lines
        if not lines:
            return 0.0
        ys = [a + k * b for _, (a, k) in lines]
        return max(0.0, _lerp([n for n, _ in lines], ys, min(max(tokens, lines[0][0]), lines[-1][0])))

    def _kv_cache_bytes_tp1(self, util: float) -> float:
        kv = self.prof["kv_cache"]
        measured = kv["num_blocks"] * kv["block_size"] * self.shape.kv_bytes_per_token
        return measured + (util - kv["gpu_memory_utilization"]) * self.spec.memory_bytes

    def codec_layer_s(self, codec: str, tokens: int) -> tuple[float, float]:
        c = self.prof.get("codecs", {}).get(codec)
        if not c:
            return self._roof.codec_layer_s(codec, tokens)
        return _lerp(c["tokens"], c["encode_s"], tokens), _lerp(c["tokens"], c["decode_s"], tokens)

    def codec_ratio(self, codec: str) -> float:
        c = self.prof.get("codecs", {}).get(codec)
        return float(c["ratio"]) if c else DEFAULT_RATIO[codec]


def load_profile(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
