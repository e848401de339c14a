"""`disagg predictor train|eval`: fit the response-length model on a request log, cross-validate it
(random folds and leave-one-source-out), report Kendall tau and bucket accuracy. The model and its
features are in router/predictor.py."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from router.predictor import (BUCKET_EDGES, DEFAULT_MODEL_PATH, DENSE_NAMES, FeatureConfig, LearnedPredictor,
                              PromptLengthPredictor, _folds, evaluate, feature_matrix, metrics, train)


def read_log(path: str) -> list[dict]:
    """Records with prompt (str), prompt_tokens and response_tokens (ints) from a JSONL request log;
    other keys are kept, lines without these (or aborted / errored requests) are skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line) if line.strip() else None
            if (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("prompt_tokens"), int)
                    and isinstance(r.get("response_tokens"), int) and r["response_tokens"] >= 0
                    and r.get("finish_reason", "stop") not in ("abort", "error")):
                out.append(r)
    return out


def _split_predictions(records: list[dict], X: np.ndarray, tr: np.ndarray, te: np.ndarray) -> dict:
    """Held-out predictions of the learned model and of the baselines, trained on rows `tr`."""
    rtr, rte = [records[i] for i in np.flatnonzero(tr)], [records[i] for i in np.flatnonzero(te)]
    m = train(rtr, FeatureConfig(n_buckets=X.shape[1] - len(DENSE_NAMES)), _X=X[tr])
    const = float(np.median([r["response_tokens"] for r in rtr]))
    by_src: dict[str, list[int]] = {}
    for r in rtr:
        by_src.setdefault(r.get("source", ""), []).append(r["response_tokens"])
    return dict(learned=np.clip(np.expm1(X[te] @ m.w.astype(np.float64) + m.bias), *m.clip),
                prompt_length=PromptLengthPredictor(rtr).predict_many([""] * len(rte),
                                                                      [r["prompt_tokens"] for r in rte]),
                constant=np.full(len(rte), const),      # the training median
                source_median=np.array([np.median(by_src.get(r.get("source", ""), [const])) for r in rte]))


def _scheme(records: list[dict], X: np.ndarray, test_masks: list[np.ndarray], skip=()) -> dict:
    """Metrics pooled over disjoint held-out sets (each trained on the rest), per set too."""
    y = np.array([r["response_tokens"] for r in records], dtype=np.float64)
    pooled, per = {}, []
    for te in test_masks:
        p = {k: v for k, v in _split_predictions(records, X, ~te, te).items() if k not in skip}
        per.append({k: metrics(v, y[te]) for k, v in p.items()})
        for k, v in p.items():
            pooled.setdefault(k, np.zeros(len(y)))[te] = v
    held = np.any(test_masks, axis=0)
    out = dict(pooled={k: metrics(v[held], y[held]) for k, v in pooled.items()}, per_split=per)
    for d in [out["pooled"], *per]:
        d["constant"]["kendall_tau"] = None      # a constant ranks nothing (pooled: folds' constants differ)
    return out


def cross_validate(records: list[dict], X: np.ndarray, k: int = 5, seed: int = 0) -> dict:
    """Leave-one-source-out, and k folds (each a random 1/k split stratified by source)."""
    src = np.array([r.get("source", "") for r in records])
    names = sorted(set(src))
    loso = _scheme(records, X, [src == s for s in names], skip=("source_median",))
    loso["per_source"] = dict(zip(names, loso.pop("per_split")))
    fold = _folds(list(src), k, seed)
    rand = _scheme(records, X, [fold == f for f in range(k)])
    return {"leave_one_source_out": loso, f"random_{100 // k}pct_x{k}": rand}


def main(argv: list[str] | None = None) -> int:
    """`disagg predictor ARGV`, ARGV = train --log FILE [--out PATH] [--holdout-source NAME ...] [--eval-only]
    [--report JSON]. Prints held-out tau / MAE / bucket accuracy against the baselines, then (unless --eval-only)
    retrains on every record and writes --out. Repeated prompts keep their first record (no train/test leak)."""
    ap = argparse.ArgumentParser(prog="disagg predictor", description="train / evaluate the response-length predictor")
    t = ap.add_subparsers(dest="cmd", required=True).add_parser(
        "train", help="retrain from a JSONL log (prompt, prompt_tokens, response_tokens[, source, finish_reason])")
    t.add_argument("--log", required=True)
    t.add_argument("--out", default=DEFAULT_MODEL_PATH, help="model file to write (with --eval-only: to read)")
    t.add_argument("--holdout-source", nargs="+", default=None,
                   help="evaluate on these sources, train on the rest (default: a random 20%% stratified by source)")
    t.add_argument("--eval-only", action="store_true",
                   help="evaluate the model at --out on the log (on the --holdout-source rows if given); write nothing")
    t.add_argument("--report", default=None, help="also run leave-one-source-out and 5-fold CV, write JSON here")
    args = ap.parse_args(argv)
    records = list({r["prompt"]: r for r in reversed(read_log(args.log))}.values())[::-1]   # first of duplicates
    if len(records) < 10:
        ap.error(f"{args.log}: {len(records)} usable records; need at least 10")
    src = [r.get("source", "") for r in records]
    te = np.isin(src, args.holdout_source) if args.holdout_source else _folds(src, 5, seed=0) == 0
    if args.eval_only:
        test = [r for r, h in zip(records, te) if h] if args.holdout_source else records
        print(json.dumps({"model": args.out, **evaluate(LearnedPredictor.load(args.out), test)}))
        return 0
    if te.all() or not te.any():
        ap.error("the held-out split is empty or holds everything")
    cfg = FeatureConfig()
    X = feature_matrix([r["prompt"] for r in records], [r["prompt_tokens"] for r in records], cfg)
    held = _scheme(records, X, [te], skip=("source_median",) if args.holdout_source else ())["pooled"]
    print(f"held out {int(te.sum())} of {len(records)} records "
          f"({'sources ' + ', '.join(args.holdout_source) if args.holdout_source else 'random 20%, stratified'}):")
    for name, m in held.items():
        tau = "  n/a " if m["kendall_tau"] is None else f"{m['kendall_tau']:+.3f}"
        print(f"  {name:14s} tau {tau}  MAE {m['mae']:7.1f}  bucket acc {m['bucket_accuracy']:.3f}")
    model = train(records, cfg, _X=X)
    model.meta["holdout"] = held["learned"]
    model.save(args.out)
    size = os.path.getsize(args.out)
    print(f"trained on all {len(records)} (alpha {model.meta['alpha']}): wrote {args.out} ({size / 1024:.0f} KiB)")
    if args.report:
        cv = cross_validate(records, X)
        info = dict(command="disagg predictor " + " ".join(sys.argv[1:] if argv is None else argv), log=args.log,
                    n=len(records), n_at_cap=sum(r.get("finish_reason") == "length" for r in records),
                    buckets=[0, *BUCKET_EDGES, None], sources={s: src.count(s) for s in sorted(set(src))},
                    model=dict(path=os.path.relpath(args.out), bytes=size, **model.meta))
        with open(args.report, "w") as f:
            json.dump({**info, **cv}, f, indent=1)
        for scheme, r in cv.items():
            print(scheme, json.dumps(r["pooled"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
