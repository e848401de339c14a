"""The colocated engine: one process runs both phases (chunked prefill mixed into decode).

    step():  schedule() -> SchedulerOutput -> runner.execute() -> StepResult
             -> scheduler.update() -> detokenize / stop strings -> [RequestOutput]

Requests are added with token ids (the front end tokenizes). Output text is produced
here only because stop strings must end a request inside the step that produced them.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

from decode.block_manager import BlockManager
from decode.prefix_cache import block_hashes
from decode.scheduler import Scheduler
from disagg.config import EngineConfig, ModelConfig
from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.engine.model_runner import ModelRunner
from disagg.model.tokenizer import Tokenizer
from disagg.request import FinishReason, Request, RequestOutput, SamplingParams
from router.policy import make_ordering


class LLMEngine:
    def __init__(self, cfg: EngineConfig, progress: bool = False, detokenize: bool = True, make_runner=None):
        """detokenize=False: token ids only (a disaggregated decode worker; the router detokenizes).
        make_runner(cfg, model_cfg, max_model_len, progress): another runner (a TP leader's shard)."""
        self.cfg = cfg
        self.detokenize = detokenize
        self.model_cfg = ModelConfig.from_dir(cfg.model_dir)
        self.tokenizer = Tokenizer(cfg.model_dir)
        mc = self.model_cfg
        max_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        if mc.sliding_window:
            # Inside the window, sliding-window attention is full attention; past it we would be wrong.
            max_len = min(max_len, mc.sliding_window)
        self.max_model_len = max_len
        eos = set(mc.eos_token_ids)
        if (eid := self.tokenizer.token_to_id(self.tokenizer.eos_token)) is not None:
            eos.add(eid)
        self.eos_token_ids = tuple(sorted(eos))
        self.runner = (make_runner or ModelRunner)(cfg, mc, max_len, progress=progress)
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.cache.block_size,
                                          enable_prefix_caching=cfg.cache.enable_prefix_caching)
        sc = cfg.scheduler
        ordering = None if sc.ordering == "fcfs" else make_ordering(sc.ordering, aging_rate=sc.aging_rate,
                                                                     max_wait_s=sc.max_wait_s)
        self.predicted: dict[str, float] = {}     # request id -> predicted response tokens (router's)
        self.scheduler = Scheduler(sc, self.block_manager, max_len, ordering=ordering,
                                   predicted_len=lambda r: self.predicted.get(r.request_id,
                                                                              float(r.params.max_tokens)))
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._reserved_prefix: dict[str, int] = {}   # reserved request id -> prompt tokens held from the cache
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, predicted_len: float | None = None) -> Request:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        if prompt_token_ids and max(prompt_token_ids) >= self.model_cfg.vocab_size or min(prompt_token_ids,
                                                                                             default=0) < 0:
            raise ValueError("prompt contains token ids outside the vocabulary")
        room = self.max_model_len - len(prompt_token_ids)
        if room > 0 and params.max_tokens > room:
            params = replace(params, max_tokens=room)
        req = Request(rid, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids)
        self.scheduler.add(req)      # raises ValueError if it can never fit
        self.requests[rid] = req
        if predicted_len is not None:
            self.predicted[rid] = predicted_len
        self.detok[rid] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.stop)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self._output(req, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ disaggregated decode
    # A decode worker's requests arrive prefilled: blocks are reserved first (Reserve), the KV
    # lands in them (kvtransfer), then the request joins the batch holding its first token.
    def reserve(self, request_id: str, num_prompt_tokens: int) -> bool:
        """Allocate blocks for the prompt and the first token; False (nothing held) if full."""
        if request_id in self.requests or self.block_manager.has(request_id):
            raise ValueError(f"duplicate request id {request_id!r}")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens does not fit the maximum context length "
                             f"of {self.max_model_len} tokens")
        return self.block_manager.allocate_slots(request_id, num_prompt_tokens + 1) is not None

    def reserve_prefix(self, request_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> int | None:
        """`reserve`, reusing the cached blocks of the prompt's longest cached prefix (full blocks, never
        the whole prompt). Returns how many leading prompt tokens are already held here, whose KV need
        not be sent, or None (nothing held) if full. Counted in the scheduler's prefix_stats."""
        n = len(prompt_token_ids)
        if request_id in self.requests or self.block_manager.has(request_id):
            raise ValueError(f"duplicate request id {request_id!r}")
        if n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens does not fit the maximum context length "
                             f"of {self.max_model_len} tokens")
        bm = self.block_manager
        hit = bm.lookup(block_hashes(prompt_token_ids, bm.block_size, cache_salt, limit=(n - 1) // bm.block_size)) \
            if bm.enable_prefix_caching else []
        if bm.allocate_slots(request_id, n + 1, hit) is None:
            return None
        cached = len(hit) * bm.block_size
        if bm.enable_prefix_caching:
            self.scheduler.prefix_stats.record(n, cached)
        self._reserved_prefix[request_id] = cached
        return cached

    def release(self, request_id: str) -> None:
        """Drop a reservation whose request never arrived."""
        if request_id not in self.requests:
            self.block_manager.free(request_id)
            self._reserved_prefix.pop(request_id, None)

    def block_table(self, request_id: str) -> list[int]:
        return self.block_manager.block_table(request_id)

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                      params: SamplingParams, kv_ok: bool = True) -> RequestOutput | None:
        """Join a request whose prompt KV sits in its reserved blocks (kv_ok) and whose first token
        was sampled by the prefill worker. Without valid KV the prompt is recomputed here, after the
        prefix this worker held already (reserve_prefix). Returns an output only if the first token
        already ends it."""
        room = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens > room:
            params = replace(params, max_tokens=max(room, 1))
        req = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids)
        req.output_token_ids.append(first_token)
        cached = self._reserved_prefix.pop(request_id, 0)
        req.num_computed_tokens = len(prompt_token_ids) if kv_ok else cached
        self.requests[request_id] = req
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.stop)
        if self.detokenize:
            self.detok[request_id].add(first_token)
        reason = self.scheduler.stop_reason(req)
        if reason is not None:
            self.scheduler._finish(req, reason)
            return self._output(req, [], [])
        self.scheduler.waiting.append(req)
        return None

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        result = self.runner.execute(sched)
        finished = {r.request_id for r in self.scheduler.update(sched, result.sampled)}
        outputs = []
        for rid, tok in result.sampled.items():
            req = self.requests[rid]
            if req.finished and rid not in finished:     # aborted during the step
                continue
            lp = result.logprobs.get(rid)
            if lp is not None:
                req.output_logprobs.append(lp)
            if self.detokenize:
                d = self.detok[rid]
                d.add(tok)
                if d.stopped and not req.finished:
                    self.scheduler.finish(rid, FinishReason.STOP)
            outputs.append(self._output(req, [tok], [lp] if lp is not None else []))
        return outputs

    def _output(self, req: Request, new_ids: list[int], new_lps: list) -> RequestOutput:
        text = ""
        if self.detokenize:
            d = self.detok[req.request_id]
            if req.finished:
                d.flush()
            text = d.delta(final=req.finished)
            req.output_text = d.text
        out = RequestOutput(req.request_id, new_ids, req.finish_reason, req.num_prompt_tokens,
                            req.num_output_tokens, new_lps, new_text=text)
        if req.finished:
            self.requests.pop(req.request_id, None)
            self.detok.pop(req.request_id, None)
            self.predicted.pop(req.request_id, None)
        return out

    # ------------------------------------------------------------------ offline helper
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (batched); returns the finished requests in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return reqs
