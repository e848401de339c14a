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
from decode.scheduler import Scheduler
from disagg.config import EngineConfig, ModelConfig
from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.engine.model_runner import ModelRunner
from disagg.model.tokenizer import Tokenizer
from disagg.request import FinishReason, Request, RequestOutput, SamplingParams


class LLMEngine:
    def __init__(self, cfg: EngineConfig, progress: bool = False):
        self.cfg = cfg
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
        self.runner = ModelRunner(cfg, mc, max_len, progress=progress)
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.cache.block_size)
        self.scheduler = Scheduler(cfg.scheduler, self.block_manager, max_len)
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
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
        self.detok[rid] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.stop)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self._output(req, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
            d = self.detok[rid]
            d.add(tok)
            if d.stopped and not req.finished:
                self.scheduler.finish(rid, FinishReason.STOP)
            outputs.append(self._output(req, [tok], [lp] if lp is not None else []))
        return outputs

    def _output(self, req: Request, new_ids: list[int], new_lps: list) -> RequestOutput:
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
        return out

    # ------------------------------------------------------------------ offline helper
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (batched); returns the finished requests in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return reqs
