"""Response-length prediction: how many tokens will the served model answer to this prompt?

A predictor belongs to a model (the same prompt gets very different answer lengths from different
models); the shipped one is fitted to SmolLM2-135M-Instruct's own greedy answers
(benchmarks/collect_lengths.py; an answer cut at max_tokens is recorded at that cap).

    LengthPredictor      predict(prompt_text, prompt_tokens) -> response tokens (float > 0)
      FixedPredictor     a constant (the fake)
      OraclePredictor    the recorded length, looked up by prompt text (benchmarks only)
      LearnedPredictor   hashed word/char n-grams + named cue features -> ridge on log(1 + len)

`prompt_text` is the user's message (the collector's `prompt`), `prompt_tokens` the templated
prompt length the engine sees. The model fits mu = E[log(1 + length)]; `predict` is the mean
exp(mu + var/2) - 1 of a log-normal with the out-of-fold residual variance (folded into the
bias), clipped to the lengths seen in training. The ranking is mu's.

Model file (.npz, read with allow_pickle=False): format, w_hash [n_buckets] f32, w_dense [n_dense]
f32 (standardisation folded in), bias, clip [2], dense_names [n_dense] str, config [4] int, meta
(a JSON string). The feature code is part of the format: other dense_names are refused.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                  "smollm2_length_predictor.npz")
FORMAT = "disagg-length-predictor-v1"
BUCKET_EDGES = (64, 128, 256)          # buckets [0,64) [64,128) [128,256) [256,inf)
ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0)  # ridge penalties tried by the inner CV


class LengthPredictor(ABC):
    @abstractmethod
    def predict(self, prompt_text: str, prompt_tokens: int) -> float:
        """Expected number of response tokens (> 0)."""

    def predict_many(self, prompt_texts: Sequence[str], prompt_tokens: Sequence[int]) -> np.ndarray:
        return np.array([self.predict(t, n) for t, n in zip(prompt_texts, prompt_tokens)], dtype=np.float64)


class FixedPredictor(LengthPredictor):
    def __init__(self, value: float = 256.0):
        if not value > 0:
            raise ValueError(f"fixed length must be > 0, got {value}")
        self.value = float(value)

    def predict(self, prompt_text: str, prompt_tokens: int) -> float:
        return self.value


class OraclePredictor(LengthPredictor):
    """True lengths by prompt text (a benchmark's upper bound); unknown prompts get `default`."""

    def __init__(self, records: Sequence[dict], default: float | None = None):
        self.lengths = {r["prompt"]: float(r["response_tokens"]) for r in records}
        ys = sorted(self.lengths.values())
        self.default = float(default if default is not None else (ys[len(ys) // 2] if ys else 256.0))

    def predict(self, prompt_text: str, prompt_tokens: int) -> float:
        return max(1.0, self.lengths.get(prompt_text, self.default))


# ---------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureConfig:
    n_buckets: int = 4096        # hashed word 1-2 grams and char n-grams share these
    char_lo: int = 3             # char n-grams of lengths char_lo..char_hi
    char_hi: int = 5
    max_chars: int = 3000        # char n-grams read the first max_chars - 500 and the last 500 chars

    def __post_init__(self):
        if self.n_buckets < 16 or not 1 <= self.char_lo <= self.char_hi or self.max_chars < 1000:
            raise ValueError(f"bad feature config {self}")


_NUM_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUM_WORDS.update({"a single": 1, "single": 1, "a": 1, "fifteen": 15, "twenty": 20, "thirty": 30, "fifty": 50,
                   "hundred": 100, "a few": 3, "few": 3, "several": 5, "couple": 2, "a couple of": 2})
_NUM = "(\\d[\\d,]*|" + "|".join(sorted(_NUM_WORDS, key=len, reverse=True)) + ")"
_RE = {k: re.compile(v) for k, v in dict(
    words=_NUM + r"\s*\+?\s*(?:-|to)?\s*(?:\d+\s*)?(?:-\s*)?words?\b",
    upper=r"(?:at most|less than|fewer than|under|no more than|maximum of|max(?:imum)?|up to|within|not exceed\w*)\s+$",
    sentences=_NUM + r"\s+(?:short\s+|brief\s+|complete\s+)?sentences?\b",
    paragraphs=_NUM + r"\s+(?:\w+\s+)?paragraphs?\b",
    items=_NUM + r"\s+(?:\w+\s+){0,2}(?:bullet points?|bullets|items|examples|ideas|tips|ways|reasons|questions|"
                 r"steps|things|names|options|sections|points|facts|words|lines|jokes|titles|slogans)\b",
    brief=r"\b(?:brief(?:ly)?|short|concise(?:ly)?|succinct(?:ly)?|one[- ]word|single word|one sentence|a sentence|"
          r"yes or no|just (?:answer|say|give|tell|reply|respond|the)|only (?:answer|respond|reply|output|give|return|"
          r"say)|tl;?dr|keep it short|in a nutshell)\b",
    long=r"\b(?:essay|article|story|blog|report|detailed|in detail|comprehensive|thorough(?:ly)?|elaborate|"
         r"step[- ]by[- ]step|guide|tutorial|explain|describe|discuss|outline|plan|proposal|analy[sz]e|compare)\b",
    creative=r"\b(?:poem|song|lyrics|rap|haiku|limerick|script|dialogue|letter|e-?mail|speech|story|riddle|joke)\b",
    code=r"\b(?:code|function|program|script|implement\w*|python|javascript|typescript|java|c\+\+|c#|sql|class|"
         r"algorithm|regex|bash|html|css|rust|golang|api|debug|compile|snippet)\b",
    math=r"\b(?:solve|calculate|compute|equation|how many|probability|integral|derivative|prove|proof|sum of|"
         r"what is \d|evaluate)\b",
    rewrite=r"\b(?:rewrite|re-write|rephrase|paraphrase|translate|summari[sz]e|summary|proofread|correct|edit|"
            r"improve|shorten|simplify|fix)\b",
    fmt=r"\b(?:json|table|markdown|bullet|numbered|title|section|highlight|placeholder|p\.s\.|postscript|capital "
        r"letters|lowercase|uppercase|quotation|double quotes|wrap|format|response should|your answer must)\b",
    harm=r"\b(?:kill|murder|steal|drugs?|bomb|hack|illegal|weapon|gun|poison|racist|hate|sex\w*|cheat|rob|hurt|die|"
         r"suicide|attack|fuck\w*|shit|bitch|stupid|insult|prank|revenge)\b",
    code_line=r"(?m)^\s*(?:def |class |import |from \w+ import|#include|public |private |function |const |let |"
              r"var |return\b|for \(|if \(|\}|\{|<\w+[^>]*>|SELECT |[\w.\[\]]+\s*=\s*[^=])",
    first_wh=r"^\W*(?:what|who|whom|when|where|which|whose)\b",
    first_yn=r"^\W*(?:is|are|can|could|do|does|did|should|would|will|was|were|have|has)\b",
    first_how=r"^\W*how\b",
    first_why=r"^\W*why\b",
    first_make=r"^\W*(?:write|create|generate|compose|draft|make|design|develop|build|give me|tell me|list)\b",
).items()}
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+|[^\w\s]")



def _num(rx: str, s: str) -> tuple[float, int]:
    """Largest count a pattern states ('300' -> 300, 'three' -> 3, '1,000' -> 1000) and where; (0, -1) if none."""
    best = (0.0, -1)
    for m in _RE[rx].finditer(s):
        t = m.group(1)
        best = max(best, (float(t.replace(",", "")) if t[0].isdigit() else float(_NUM_WORDS[t]), m.start()))
    return best


def _cues(text: str, prompt_tokens: int) -> dict[str, float]:
    s, has = text.lower(), lambda rx, t=None: float(bool(_RE[rx].search(t or s)))
    lines, words, head = [ln for ln in s.splitlines() if ln.strip()], s.split(), s[:300]
    nw, at = _num("words", s)
    nsent, npar, nitem = _num("sentences", s)[0], _num("paragraphs", s)[0], _num("items", s)[0]
    return dict(
        log_prompt_tokens=math.log1p(prompt_tokens), log_chars=math.log1p(len(s)), log_words=math.log1p(len(words)),
        log_lines=math.log1p(len(lines)),
        frac_nonalpha=sum(not (c.isalpha() or c.isspace()) for c in s) / max(1, len(s)),
        log_qmarks=math.log1p(s.count("?")), ends_q=float(s.rstrip().endswith("?")), code_block=float("```" in s),
        code_line_frac=sum(bool(_RE["code_line"].match(ln)) for ln in lines) / max(1, len(lines)),
        word_target=float(nw > 0), log_word_target=math.log1p(min(nw, 5000)),    # "300+ words", "in 50 words"
        word_upper=float(at >= 0 and bool(_RE["upper"].search(s[max(0, at - 25):at]))),   # "at most 50 words"
        log_sentences=math.log1p(min(nsent, 100)), has_sentences=float(nsent > 0),
        log_paragraphs=math.log1p(min(npar, 50)), has_paragraphs=float(npar > 0),
        log_items=math.log1p(min(nitem, 100)), has_items=float(nitem > 0),
        brief=has("brief"), log_long=math.log1p(len(_RE["long"].findall(s))), creative=has("creative"),
        log_code=math.log1p(len(_RE["code"].findall(s))), math=has("math"), rewrite=has("rewrite"),
        rewrite_x_len=has("rewrite") * math.log1p(prompt_tokens),    # rewrites scale with their input
        log_fmt=math.log1p(len(_RE["fmt"].findall(s))), log_harm=math.log1p(len(_RE["harm"].findall(s))),
        first_wh=has("first_wh", head), first_yn=has("first_yn", head), first_how=has("first_how", head),
        first_why=has("first_why", head), first_make=has("first_make", head), short_prompt=float(len(words) <= 12))


DENSE_NAMES = tuple(_cues("", 0))


def dense_features(text: str, prompt_tokens: int) -> np.ndarray:
    """Named cue features, in DENSE_NAMES order (raw: standardisation is part of the model)."""
    return np.fromiter(_cues(text, prompt_tokens).values(), dtype=np.float64, count=len(DENSE_NAMES))


def _bucket(key: str, n: int) -> tuple[int, float]:
    h = zlib.crc32(key.encode("utf-8"))            # stable across processes (unlike hash())
    return (h >> 1) % n, (1.0 if h & 1 else -1.0)   # signed hashing: collisions cancel on average


def hashed_features(text: str, cfg: FeatureConfig) -> dict[int, float]:
    """Word 1-2 grams (numbers as <numK>, K digits) and char n-grams, log-counted, each family L2-normed."""
    s = " ".join(text.lower().split())
    toks = ["<num%d>" % min(len(t), 5) if t.isdigit() else t for t in _TOKEN.findall(s)]
    grams = [("w", toks), ("b", [a + " " + b for a, b in zip(toks, toks[1:])])]
    if len(s) > cfg.max_chars:
        s = s[:cfg.max_chars - 500] + " " + s[-500:]
    s = " " + s + " "
    grams.append(("c", [s[i:i + k] for k in range(cfg.char_lo, cfg.char_hi + 1) for i in range(len(s) - k + 1)]))
    out: dict[int, float] = {}
    for fam, items in grams:
        fv: dict[int, float] = {}
        for g, c in Counter(items).items():
            i, sign = _bucket(fam + ":" + g, cfg.n_buckets)
            fv[i] = fv.get(i, 0.0) + sign * math.log1p(c)
        norm = math.sqrt(sum(v * v for v in fv.values())) or 1.0
        for i, v in fv.items():
            out[i] = out.get(i, 0.0) + v / norm
    return out


def feature_matrix(texts: Sequence[str], tokens: Sequence[int], cfg: FeatureConfig) -> np.ndarray:
    """[n, n_buckets + n_dense] raw features."""
    X = np.zeros((len(texts), cfg.n_buckets + len(DENSE_NAMES)))
    for r, (t, n) in enumerate(zip(texts, tokens)):
        h = hashed_features(t, cfg)
        X[r, list(h)] = list(h.values())
        X[r, cfg.n_buckets:] = dense_features(t, n)
    return X


# ---------------------------------------------------------------------------- the learned model
class LearnedPredictor(LengthPredictor):
    """score = w . features + bias (= mu + var/2); predict = clip(expm1(score))."""

    def __init__(self, cfg: FeatureConfig, w: np.ndarray, bias: float, clip: tuple[float, float], meta: dict):
        assert w.shape == (cfg.n_buckets + len(DENSE_NAMES),)
        self.cfg, self.w, self.bias, self.clip, self.meta = cfg, w.astype(np.float32), float(bias), clip, meta

    def score(self, prompt_text: str, prompt_tokens: int) -> float:
        h = hashed_features(prompt_text, self.cfg)
        idx = np.fromiter(h, dtype=np.int64, count=len(h))
        val = np.fromiter(h.values(), dtype=np.float64, count=len(h))
        d = dense_features(prompt_text, prompt_tokens)
        return float(val @ self.w[idx] + d @ self.w[self.cfg.n_buckets:] + self.bias)

    def predict(self, prompt_text: str, prompt_tokens: int) -> float:
        return float(np.clip(math.expm1(self.score(prompt_text, prompt_tokens)), *self.clip))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        c = self.cfg
        with open(path, "wb") as f:    # a file object: np.savez would append .npz to a bare name
            np.savez_compressed(
                f, format=np.str_(FORMAT), w_hash=self.w[:c.n_buckets], w_dense=self.w[c.n_buckets:],
                bias=np.float64(self.bias), clip=np.array(self.clip, dtype=np.float64),
                dense_names=np.array(DENSE_NAMES), config=np.array([c.n_buckets, c.char_lo, c.char_hi, c.max_chars]),
                meta=np.str_(json.dumps(self.meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str = DEFAULT_MODEL_PATH) -> "LearnedPredictor":
        """Raises ValueError for pickled content, another format, or another feature set."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise ValueError(f"{path}: format {str(z['format'])!r}, expected {FORMAT!r}")
                if tuple(str(s) for s in z["dense_names"]) != DENSE_NAMES:
                    raise ValueError(f"{path}: built for another feature set; retrain it")
                cfg = FeatureConfig(*(int(v) for v in z["config"]))
                w = np.concatenate([z["w_hash"], z["w_dense"]])
                return cls(cfg, w, float(z["bias"]), tuple(float(v) for v in z["clip"]), json.loads(str(z["meta"])))
        except (KeyError, AssertionError, TypeError) as e:
            raise ValueError(f"{path}: not a length-predictor file ({e})") from None

    def predict_many(self, prompt_texts: Sequence[str], prompt_tokens: Sequence[int]) -> np.ndarray:
        X = feature_matrix(prompt_texts, prompt_tokens, self.cfg)
        return np.clip(np.expm1(X @ self.w.astype(np.float64) + self.bias), *self.clip)


def _ridge(X: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """min |Xw + b - y|^2 + alpha |w|^2 (dual form when n < d)."""
    xm, ym = X.mean(0), y.mean()
    Xc = X - xm
    if len(X) < X.shape[1]:
        w = Xc.T @ np.linalg.solve(Xc @ Xc.T + alpha * np.eye(len(X)), y - ym)
    else:
        w = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def _standardise(X: np.ndarray, n_hash: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column scale: 1 for hashed columns, 1/std for dense ones (so one alpha suits both)."""
    scale = np.ones(X.shape[1])
    sd = X[:, n_hash:].std(0)
    scale[n_hash:] = np.where(sd > 1e-9, 1.0 / np.maximum(sd, 1e-9), 0.0)
    return X * scale, scale


def _folds(groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold id per row, stratified by group (each group dealt round-robin after a shuffle)."""
    rng, fold = np.random.default_rng(seed), np.zeros(len(groups), dtype=np.int64)
    for g in sorted(set(groups)):
        rows = rng.permutation([i for i, x in enumerate(groups) if x == g])
        fold[rows] = (np.arange(len(rows)) + rng.integers(k)) % k
    return fold


def _fit(X: np.ndarray, y: np.ndarray, groups: Sequence[str], n_hash: int, alpha: float | None):
    """Ridge on standardised X -> (w, b, alpha, out-of-fold residual variance of y).
    5-fold CV stratified by group; it picks alpha (best Kendall tau) when alpha is None."""
    Xs, scale = _standardise(X, n_hash)
    grid = ALPHAS if alpha is None else (alpha,)
    fold, taus, oof = _folds(groups, 5, seed=1), np.zeros(len(grid)), np.full((len(grid), len(y)), np.nan)
    for f in range(5):
        tr, va = fold != f, fold == f
        if tr.sum() < 4 or va.sum() < 2:
            continue
        xm = Xs[tr].mean(0)
        A, V, yc = Xs[tr] - xm, Xs[va] - xm, y[tr] - y[tr].mean()
        if len(A) < A.shape[1]:     # one eigh serves every alpha: dual  w = A^T (AA^T + a)^-1 y
            s, Q = np.linalg.eigh(A @ A.T)
            VQ, qy = V @ A.T @ Q, Q.T @ yc
        else:                       # primal  w = (A^TA + a)^-1 A^T y
            s, Q = np.linalg.eigh(A.T @ A)
            VQ, qy = V @ Q, Q.T @ (A.T @ yc)
        for j, a in enumerate(grid):
            oof[j, va] = VQ @ (qy / (s + a)) + y[tr].mean()
            taus[j] += va.sum() * np.nan_to_num(kendall_tau(oof[j, va], y[va]))
    j = int(np.argmax(taus))
    seen = ~np.isnan(oof[j])
    var = float(np.mean((oof[j, seen] - y[seen]) ** 2)) if seen.any() else 0.0
    w, b = _ridge(Xs, y, grid[j])
    return w * scale, b, grid[j], var


def train(records: Sequence[dict], cfg: FeatureConfig = FeatureConfig(), alpha: float | None = None,
          _X: np.ndarray | None = None) -> LearnedPredictor:
    """Fit on records with prompt, prompt_tokens, response_tokens (optional source)."""
    if len(records) < 2:
        raise ValueError("need at least 2 records to train")
    y = np.log1p(np.array([r["response_tokens"] for r in records], dtype=np.float64))
    X = _X if _X is not None else feature_matrix([r["prompt"] for r in records],
                                                 [r["prompt_tokens"] for r in records], cfg)
    w, b, alpha, var = _fit(X, y, [r.get("source", "") for r in records], cfg.n_buckets, alpha)
    meta = dict(n=len(records), alpha=alpha, log_var=round(var, 4),
                sources=sorted({r.get("source", "") for r in records}))
    # E[len] = exp(mu + var/2) for log-normal residuals: the shift moves no prediction past another
    return LearnedPredictor(cfg, w, b + var / 2, (1.0, float(np.expm1(y).max())), meta)


class PromptLengthPredictor(LengthPredictor):
    """Baseline: a line in log(1 + prompt tokens) -> log(1 + response tokens)."""

    def __init__(self, records: Sequence[dict]):
        x = np.log1p([r["prompt_tokens"] for r in records])
        y = np.log1p([r["response_tokens"] for r in records])
        self.slope, self.icpt = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(np.mean(y)))

    def predict(self, prompt_text: str, prompt_tokens: int) -> float:
        return max(1.0, math.expm1(self.slope * math.log1p(prompt_tokens) + self.icpt))


# ---------------------------------------------------------------------------- registry
def load_default_predictor() -> LearnedPredictor:
    return LearnedPredictor.load(DEFAULT_MODEL_PATH)


PREDICTORS: dict[str, Callable[..., LengthPredictor]] = {
    "fixed": FixedPredictor, "oracle": OraclePredictor, "learned": LearnedPredictor.load,
    "prompt_length": PromptLengthPredictor,
}


def get_predictor(name: str, **kwargs) -> LengthPredictor:
    try:
        return PREDICTORS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown length predictor {name!r}; choose one of {', '.join(PREDICTORS)}") from None


# ---------------------------------------------------------------------------- evaluation
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable), O(n^2); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, s, tx, ty = len(x), 0.0, 0.0, 0.0
    for a in range(0, n, 1024):                      # row blocks bound memory at 1024 x n
        dx = np.sign(x[a:a + 1024, None] - x[None, :])
        dy = np.sign(y[a:a + 1024, None] - y[None, :])
        s += float((dx * dy).sum())
        tx, ty = tx + float((dx == 0).sum()), ty + float((dy == 0).sum())
    n0 = n * (n - 1) / 2                              # ordered pairs counted twice, diagonal once
    n1, n2 = (tx - n) / 2, (ty - n) / 2
    den = math.sqrt((n0 - n1) * (n0 - n2))
    return s / 2 / den if den > 0 else float("nan")


def bucket_of(v: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(BUCKET_EDGES), np.asarray(v), side="right")


def metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    tau = kendall_tau(pred, true)
    return dict(kendall_tau=None if math.isnan(tau) else round(tau, 4),
                mae=round(float(np.abs(pred - true).mean()), 2),
                bucket_accuracy=round(float((bucket_of(pred) == bucket_of(true)).mean()), 4), n=len(true))


def evaluate(pred: LengthPredictor, records: Sequence[dict]) -> dict:
    """kendall_tau (None when undefined), mae (tokens), bucket_accuracy over BUCKET_EDGES, n."""
    p = pred.predict_many([r["prompt"] for r in records], [r["prompt_tokens"] for r in records])
    return metrics(p, np.array([r["response_tokens"] for r in records]))
