"""Response-length predictor: Kendall tau-b on hand-computed cases, learning a cue word from a
synthetic set, the .npz round trip (and refusal of pickles), the train-from-log CLI, the shipped model."""
from __future__ import annotations

import json
import math
import os
import pickle
import random

import numpy as np
import pytest

from router.predictor import (DEFAULT_MODEL_PATH, FeatureConfig, FixedPredictor, LearnedPredictor, OraclePredictor,
                              bucket_of, dense_features, DENSE_NAMES, evaluate, get_predictor, kendall_tau, train)
from router.predictor_cli import main, read_log


# ---------------------------------------------------------------------------- Kendall tau-b
@pytest.mark.parametrize("x, y, want", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3], [1, 3, 2], 1 / 3),                      # C=2, D=1 of 3 pairs
    ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),                # C=5, D=1
    # ties: x pairs tied 1 ((1,1)), y pairs tied 1 ((3,3)); C=4, D=0 of 6 -> 4/sqrt(5*5)
    ([1, 1, 2, 3], [1, 2, 3, 3], 4 / 5),
    # x ties 1 ((2,2)), y ties 2 ((0,0) and (5,5)): C=3, D=0 -> 3/sqrt(5*4)
    ([1, 2, 2, 3], [0, 0, 5, 5], 3 / math.sqrt(20)),
    # x ties 1, y none: C=2, D=3 -> -1/sqrt(5*6)
    ([1, 2, 2, 3], [3, 0, 5, 1], -1 / math.sqrt(30)),
])
def test_kendall_tau_hand_computed(x, y, want):
    assert kendall_tau(x, y) == pytest.approx(want, abs=1e-12)
    assert kendall_tau(y, x) == pytest.approx(want, abs=1e-12)


def test_kendall_tau_undefined_and_blocked():
    assert math.isnan(kendall_tau([3, 3, 3], [1, 2, 3]))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, 2500), rng.integers(0, 20, 2500)    # > one 1024-row block, many ties
    x[:3], y[:3] = 1, 1
    # reference: explicit pair loop on a subsample vs the blocked version on the same subsample
    xs, ys = x[:300], y[:300]
    c = d = tx = ty = 0
    for i in range(300):
        for j in range(i + 1, 300):
            a, b = np.sign(xs[i] - xs[j]), np.sign(ys[i] - ys[j])
            c, d, tx, ty = c + (a * b > 0), d + (a * b < 0), tx + (a == 0), ty + (b == 0)
    n0 = 300 * 299 / 2
    assert kendall_tau(xs, ys) == pytest.approx((c - d) / math.sqrt((n0 - tx) * (n0 - ty)), abs=1e-12)
    assert abs(kendall_tau(x, y)) < 0.1


def test_buckets():
    assert bucket_of(np.array([0, 63, 64, 127, 128, 255, 256, 9999])).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ---------------------------------------------------------------------------- a synthetic set
TOPICS = "rivers volcanoes tax law jazz chess bread tides comets whales glaciers opera bees maps soap".split()


def synthetic(n: int, seed: int) -> list[dict]:
    """Length set by a made-up cue word (only the hashed n-grams can see it), noise-free so that
    tau-b can reach 1: tied truths within a cue, every cross-cue pair ordered."""
    rnd, out = random.Random(seed), []
    for i in range(n):
        cue, length = rnd.choice([("plonk", 10), ("quux", 40), ("", 100), ("zorblax", 400)])
        topic = " ".join(rnd.sample(TOPICS, 2))
        prompt = f"Tell me {cue} about {topic}".replace("  ", " ")
        out.append(dict(source=f"s{i % 3}", prompt=prompt, prompt_tokens=len(prompt.split()) + 10,
                        response_tokens=length, finish_reason="stop"))
    return out


@pytest.fixture(scope="module")
def small_model():
    return train(synthetic(240, seed=0), FeatureConfig(n_buckets=512))


def test_learns_a_cue_word(small_model):
    test = synthetic(150, seed=1)
    m = evaluate(small_model, test)
    assert m["n"] == 150 and m["kendall_tau"] > 0.8, m
    assert small_model.predict("Tell me plonk about jazz", 16) < 60 < small_model.predict(
        "Tell me zorblax about jazz", 16)


def test_save_load_round_trip_and_pickle_refusal(small_model, tmp_path):
    path = str(tmp_path / "m.npz")
    small_model.save(path)
    again = LearnedPredictor.load(path)
    test = synthetic(20, seed=2)
    texts, toks = [r["prompt"] for r in test], [r["prompt_tokens"] for r in test]
    np.testing.assert_array_equal(small_model.predict_many(texts, toks), again.predict_many(texts, toks))
    assert [small_model.predict(t, n) for t, n in zip(texts, toks)] == [again.predict(t, n)
                                                                       for t, n in zip(texts, toks)]
    np.testing.assert_allclose(again.predict_many(texts, toks), [again.predict(t, n) for t, n in zip(texts, toks)],
                               rtol=1e-5)
    bad = tmp_path / "obj.npz"                          # an object array needs pickle to load
    np.savez(bad, format=np.array(["x", {"evil": 1}], dtype=object))
    with pytest.raises(ValueError):
        LearnedPredictor.load(str(bad))
    raw = tmp_path / "raw.npz"                          # a bare pickle under an .npz name
    raw.write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(ValueError):
        LearnedPredictor.load(str(raw))
    other = tmp_path / "other.npz"                      # right keys, another feature set
    with np.load(path) as z:
        d = dict(z)
    d["dense_names"] = np.array(list(DENSE_NAMES[:-1]) + ["something_else"])
    np.savez(other, **d)
    with pytest.raises(ValueError, match="feature set"):
        LearnedPredictor.load(str(other))


def test_fake_oracle_and_registry():
    recs = synthetic(10, seed=3)
    assert get_predictor("fixed", value=7).predict("anything", 3) == 7.0
    o = get_predictor("oracle", records=recs)
    assert isinstance(o, OraclePredictor)
    assert o.predict(recs[4]["prompt"], 0) == recs[4]["response_tokens"]
    assert evaluate(o, recs)["kendall_tau"] == pytest.approx(1.0) or len({r["response_tokens"] for r in recs}) < 10
    assert evaluate(FixedPredictor(100.0), recs)["kendall_tau"] is None
    with pytest.raises(ValueError, match="unknown length predictor"):
        get_predictor("psychic")


def test_cue_features():
    f = dict(zip(DENSE_NAMES, dense_features("Write a 300+ word essay about bees. Use at least three paragraphs.", 30)))
    assert f["word_target"] == 1 and f["log_word_target"] == pytest.approx(math.log1p(300))
    assert f["log_paragraphs"] == pytest.approx(math.log1p(3)) and f["first_make"] == 1
    g = dict(zip(DENSE_NAMES, dense_features("In no more than 50 words, what is a tide? Answer in one sentence.", 25)))
    assert g["word_upper"] == 1 and g["log_sentences"] == pytest.approx(math.log1p(1)) and g["brief"] == 1


# ---------------------------------------------------------------------------- the CLI
def test_train_from_log_cli(tmp_path, capsys):
    recs = synthetic(120, seed=4)
    log = tmp_path / "requests.jsonl"
    with open(log, "w") as f:
        for r in recs:
            f.write(json.dumps({**r, "request_id": "x", "arrival_s": 1.0}) + "\n")
        f.write("\n" + json.dumps({"prompt": "aborted", "prompt_tokens": 3, "response_tokens": 1,
                                   "finish_reason": "abort"}) + "\n" + json.dumps({"no": "fields"}) + "\n")
    assert len(read_log(str(log))) == 120
    first = {}                                          # the CLI keeps the first record of a repeated prompt
    for r in recs:
        first.setdefault(r["prompt"], r)
    out = str(tmp_path / "model.npz")
    assert main(["train", "--log", str(log), "--out", out]) == 0
    text = capsys.readouterr().out
    assert "learned" in text and "prompt_length" in text and os.path.exists(out)
    assert LearnedPredictor.load(out).meta["n"] == len(first)
    assert main(["train", "--log", str(log), "--out", out, "--holdout-source", "s1", "--eval-only"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == sum(r["source"] == "s1" for r in first.values()) and res["kendall_tau"] > 0.5
    report = str(tmp_path / "report.json")
    assert main(["train", "--log", str(log), "--out", out, "--holdout-source", "s0", "--report", report]) == 0
    rep = json.load(open(report))
    assert set(rep["leave_one_source_out"]["per_source"]) == {"s0", "s1", "s2"}
    assert rep["leave_one_source_out"]["pooled"]["learned"]["n"] == len(first)
    assert rep["random_20pct_x5"]["pooled"]["learned"]["kendall_tau"] > 0.8
    assert rep["random_20pct_x5"]["pooled"]["constant"]["kendall_tau"] is None


# ---------------------------------------------------------------------------- the shipped model
@pytest.mark.skipif(not os.path.exists(DEFAULT_MODEL_PATH), reason="no shipped model file")
def test_shipped_model_loads_and_predicts():
    from router.predictor import load_default_predictor
    m = load_default_predictor()
    assert os.path.getsize(DEFAULT_MODEL_PATH) < 2 * 1024 * 1024
    prompts = ["Hi", "Write a 500 word essay on the history of jazz.", "What is 2+2? Answer in one word.",
               "def f(x):\n    return x\n\nExplain this code.", "é" * 10000]
    ys = m.predict_many(prompts, [20, 35, 30, 40, 5000])
    assert np.all(np.isfinite(ys)) and np.all(ys > 0)
    assert all(math.isfinite(m.predict(p, 10)) and m.predict(p, 10) > 0 for p in prompts)
