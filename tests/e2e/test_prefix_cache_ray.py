"""Prefix caching through the Ray cluster (2 prefill + 1 decode CPU actors, gloo, cache-aware routing):
a conversation's next turn and a shared system prompt equal the colocated engine with the cache off,
while the prefill workers compute, and the channel carries, only the uncached tokens."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
import torch

from disagg.request import SamplingParams

ray = pytest.importorskip("ray")

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _tokens(seed, n):
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def _one(eng, prompt, params):
    toks = []
    async for out in eng.generate(prompt, params, uuid.uuid4().hex):
        toks.extend(out.new_token_ids)
    return toks


def test_next_turn_and_system_prompt_through_the_cluster(tiny_ckpts):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.messages import WorkerLoad, decode
    from disagg.model.tokenizer import Tokenizer
    d = tiny_ckpts("llama_gqa")
    ref = EngineConfig(d, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=256, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64))
    from disagg.engine.llm_engine import LLMEngine
    colocated = LLMEngine(ref)
    ecfg = EngineConfig(d, device="cpu", cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=64))
    eng = DisaggEngine(ClusterConfig(ecfg, 2, 1, kv_codec="none", use_gpus=False, local_prefill="never"),
                       Tokenizer(d), log=lambda *a: None)
    eng.launch()
    a, system = _tokens(1, 37), _tokens(2, 40)

    async def fresh_loads(busy=None):
        # The router's periodic load poll could deliver a report taken before the previous request
        # finished, right when the next one is routed; poll here instead, so the routing of these
        # back-to-back requests does not depend on timing. `busy`: make that prefill rank look
        # loaded, so a first request lands on rank 1 and least-loaded routing (ties: rank 0) would
        # send the follow-up elsewhere.
        for r, act in eng.actors.items():
            eng.dispatcher.loads[r] = decode(await act.load.remote(), WorkerLoad)
        if busy is not None:
            eng.dispatcher.loads[busy] = replace(eng.dispatcher.loads[busy], queued_prompt_tokens=10_000)

    async def run():
        eng.start()
        for t in eng._tasks:
            if t.get_coro().__name__ == "_poll_loads":
                t.cancel()
        try:
            await fresh_loads(busy=0)
            out_a = await _one(eng, a, PARAMS)
            b = a + out_a + _tokens(3, 6)                   # the next turn: 53 tokens
            await fresh_loads()
            out_b = await _one(eng, b, PARAMS)
            c, dd = system + _tokens(4, 5), system + _tokens(5, 5)
            await fresh_loads(busy=0)
            out_c = await _one(eng, c, PARAMS)
            await fresh_loads()
            out_d = await _one(eng, dd, PARAMS)
            return [(a, out_a), (b, out_b), (c, out_c), (dd, out_d)]
        finally:
            for t in eng._tasks:
                t.cancel()
    try:
        served = asyncio.run(run())
        loads = {r: decode(ray.get(act.load.remote()), WorkerLoad) for r, act in eng.actors.items()}
        sent = sum(ray.get(eng.actors[r].transfer_stats.remote())["bytes_raw"] for r in eng.prefill_ranks)
        eng.check_integrity()
    finally:
        eng.stop()
    for prompt, toks in served:
        assert toks == colocated.generate([prompt], PARAMS)[0].output_token_ids
    pre = [loads[r] for r in eng.prefill_ranks]
    # every request went to prefill rank 1, where a and the system prompt were: b reused a's 9 full
    # prompt blocks and d the system prompt's 10 (least-loaded routing would have sent b and d to rank 0)
    assert [w.prefix_cache_hits for w in pre] == [0, 36 + 40]
    assert [w.prefix_cache_queries for w in pre] == [0, 37 + 53 + 45 + 45]
    dec = loads[eng.decode_ranks[0]]
    # the decode worker kept a's prompt and answer (46 computed tokens: 11 blocks) and the system prompt
    assert dec.prefix_cache_hits == 44 + 40
    mc_bytes = 2 * 2 * 2 * 16 * 4                           # K and V, 2 layers, 2 KV heads, head_dim 16, fp32
    assert sent == mc_bytes * (37 + (53 - 44) + 45 + (45 - 40))
