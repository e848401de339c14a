"""sample(): greedy, temperature, top-k, top-p, per-request seeds, logprobs (CPU, exact or seeded)."""
from __future__ import annotations

import math

import pytest
import torch

from decode.sampler import _apply_top_k_top_p, sample
from disagg.request import SamplingParams

V = 50


def logits_rows(n: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3


def test_greedy_equals_argmax():
    x = logits_rows(16)
    res = sample(x, [SamplingParams(temperature=0.0)] * 16, [0] * 16)
    assert res.token_ids == x.argmax(dim=-1).tolist()
    assert res.logprobs == [None] * 16


def test_top_k_1_equals_greedy_at_any_temperature():
    torch.manual_seed(0)
    x = logits_rows(16, seed=1)
    for t in (0.5, 1.0, 5.0):
        res = sample(x, [SamplingParams(temperature=t, top_k=1)] * 16, [0] * 16)
        assert res.token_ids == x.argmax(dim=-1).tolist()


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    torch.manual_seed(0)
    x = logits_rows(8, seed=2)
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.5)
              for i in range(8)]
    res = sample(x, params, [0] * 8)
    greedy_rows = [res.token_ids[i] for i in range(1, 8, 2)]
    assert greedy_rows == x[1::2].argmax(dim=-1).tolist()


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_samples_only_from_the_k_largest(k):
    torch.manual_seed(1)
    n = 4000
    row = logits_rows(1, seed=3)[0] * 0.2            # flat-ish: the tail would be hit without top-k
    x = row.expand(n, V).contiguous()
    res = sample(x, [SamplingParams(temperature=1.0, top_k=k)] * n, [0] * n)
    allowed = set(row.topk(k).indices.tolist())
    seen = set(res.token_ids)
    assert seen <= allowed
    assert seen == allowed                           # every one of the k is reachable


def test_top_k_larger_than_vocab_is_no_restriction():
    x = logits_rows(3, seed=4)
    out = _apply_top_k_top_p(x, torch.tensor([V + 10, 0, V]), torch.ones(3))
    assert torch.equal(out, x)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625: powers of two, so softmax and cumsum are exact
    probs = torch.tensor([0.0625, 0.5, 0.125, 0.0625, 0.25])
    x = probs.log()[None, :]
    assert x.softmax(-1)[0].tolist() == probs.tolist()
    cases = {
        0.3: {1},            # 0.5 >= 0.3
        0.5: {1},            # 0.5 reaches 0.5 exactly: nothing more
        0.5001: {1, 4},
        0.75: {1, 4},        # 0.75 exactly
        0.8: {1, 4, 2},
        0.875: {1, 4, 2},
        0.95: {0, 1, 2, 3, 4},
        1.0: {0, 1, 2, 3, 4},
    }
    for p, want in cases.items():
        out = _apply_top_k_top_p(x, torch.zeros(1, dtype=torch.long), torch.tensor([p]))[0]
        fin = torch.isfinite(out)
        assert set(torch.nonzero(fin).flatten().tolist()) == want, p
        assert torch.equal(out[fin], x[0][fin])       # kept logits are unchanged


def test_top_p_1_keeps_the_whole_vocab():
    """top_p=1 is 'off': rows without top-k/top-p must be untouched when another row in the batch
    turns the filter on (else the tail is cut by float32 cumsum rounding, and a seeded row's
    tokens depend on its batch)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(8, 32000, generator=g) * 3
    out = _apply_top_k_top_p(x, torch.zeros(8, dtype=torch.long), torch.ones(8))
    assert torch.equal(out, x)
    out = _apply_top_k_top_p(x, torch.full((8,), 40), torch.ones(8))
    assert (torch.isfinite(out).sum(-1) == 40).all()


def test_top_p_sampling_stays_in_the_nucleus():
    torch.manual_seed(2)
    probs = torch.tensor([0.0625, 0.5, 0.125, 0.0625, 0.25])
    n = 3000
    x = probs.log()[None, :].expand(n, 5).contiguous()
    res = sample(x, [SamplingParams(temperature=1.0, top_p=0.75)] * n, [0] * n)
    counts = torch.bincount(torch.tensor(res.token_ids), minlength=5).tolist()
    assert counts[0] == counts[2] == counts[3] == 0
    assert abs(counts[1] / n - 2 / 3) < 0.03          # renormalized: 0.5 / 0.75
    assert abs(counts[4] / n - 1 / 3) < 0.03


def test_top_k_then_top_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    x = probs.log()[None, :]
    # top-k=2 renormalizes to 4/7, 3/7; top_p=0.5 then keeps only the first
    out = _apply_top_k_top_p(x, torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    out = _apply_top_k_top_p(x, torch.tensor([3]), torch.tensor([0.6]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_seeded_row_is_independent_of_the_batch():
    x = logits_rows(1, seed=5)[0]
    p = SamplingParams(temperature=1.0, seed=1234)

    def alone(idx: int) -> int:
        torch.manual_seed(99)
        return sample(x[None, :], [p], [idx]).token_ids[0]

    ref = [alone(i) for i in range(12)]
    assert len(set(ref)) > 3                         # it really samples
    others = logits_rows(5, seed=6)
    batches = [
        ([SamplingParams(temperature=0.0)] * 5, 0),
        ([SamplingParams(temperature=0.7)] * 5, 3),
        ([SamplingParams(temperature=1.0, top_k=3), SamplingParams(top_p=0.5),
          SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.0),
          SamplingParams(temperature=2.0)], 5),
    ]
    for other_params, pos in batches:
        for rng_seed in (0, 1):
            torch.manual_seed(rng_seed)
            for i in range(12):
                rows = torch.cat([others[:pos], x[None, :], others[pos:]])
                params = other_params[:pos] + [p] + other_params[pos:]
                idx = [i + 100 * j for j in range(pos)] + [i] + [i + 7 * j for j in range(5 - pos)]
                assert sample(rows, params, idx).token_ids[pos] == ref[i]


def test_different_seeds_or_indices_differ():
    x = logits_rows(1, seed=5)
    a = [sample(x, [SamplingParams(seed=1)], [i]).token_ids[0] for i in range(40)]
    b = [sample(x, [SamplingParams(seed=2)], [i]).token_ids[0] for i in range(40)]
    assert a != b


def test_temperature_near_zero_is_greedy():
    torch.manual_seed(3)
    x = logits_rows(64, seed=7)
    for t in (1e-6, 1e-4):
        res = sample(x, [SamplingParams(temperature=t)] * 64, [0] * 64)
        assert res.token_ids == x.argmax(dim=-1).tolist()


def test_empirical_frequencies_match_softmax():
    torch.manual_seed(4)
    row = torch.tensor([1.0, 0.0, -1.0])
    n = 40000
    res = sample(row.expand(n, 3).contiguous(), [SamplingParams(temperature=1.0)] * n, [0] * n)
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=3).float() / n
    expect = row.softmax(-1)                         # 0.665, 0.245, 0.090
    assert torch.allclose(freq, expect, atol=0.015), (freq, expect)


def test_temperature_scales_the_distribution():
    torch.manual_seed(5)
    row = torch.tensor([1.0, 0.0, -1.0])
    n = 40000
    res = sample(row.expand(n, 3).contiguous(), [SamplingParams(temperature=2.0)] * n, [0] * n)
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=3).float() / n
    assert torch.allclose(freq, (row / 2).softmax(-1), atol=0.015)


def test_logprobs_chosen_and_top_n():
    torch.manual_seed(6)
    x = logits_rows(4, seed=8)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, logprobs=5), SamplingParams(temperature=0.0, logprobs=0)]
    res = sample(x, params, [0] * 4)
    lp = x.log_softmax(dim=-1)
    assert res.logprobs[1] is None
    for i, n in ((0, 3), (2, 5), (3, 0)):
        chosen, top = res.logprobs[i]
        assert chosen == pytest.approx(lp[i, res.token_ids[i]].item(), abs=1e-6)
        assert len(top) == n
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        ref_v, ref_i = lp[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in top] == ref_i.tolist()
        assert vals == pytest.approx(ref_v.tolist(), abs=1e-6)
    # greedy row: chosen is the top-1 entry
    assert res.logprobs[0][1][0] == (res.token_ids[0], pytest.approx(res.logprobs[0][0]))
    assert math.isclose(sum(math.exp(v) for v in lp[0].tolist()), 1.0, rel_tol=1e-5)


def test_logprobs_top_n_larger_than_vocab_returns_the_whole_vocab():
    x = logits_rows(2, seed=9, vocab=6)
    res = sample(x, [SamplingParams(temperature=0.0, logprobs=20), SamplingParams(temperature=0.0, logprobs=2)],
                 [0, 0])
    lp = x.log_softmax(dim=-1)
    assert [t for t, _ in res.logprobs[0][1]] == lp[0].argsort(descending=True).tolist()
    assert len(res.logprobs[1][1]) == 2
