"""`disagg bench` end to end against the real router (router/server.py over router/fake_engine.py), and
the HF baseline server of benchmarks/hf_server.py on a tiny random model. No Ray, no timings asserted."""
from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from disagg.bench import loadgen
from serve_thread import Serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def FakeServe(tok_dir: str, **engine_kw) -> Serve:
    """router.server.Server over a FakeEngine (8 tokens a request at most), in a thread with its own loop."""
    from disagg.model.tokenizer import Tokenizer
    from router.fake_engine import FakeEngine
    return Serve(lambda: FakeEngine(**engine_kw), Tokenizer(tok_dir), 512, name="fake-model")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from router.fake_engine import write_word_tokenizer
    return write_word_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _bench(argv, capsys):
    from disagg.cli import main
    rc = main(["bench", "--no-progress", "--vocab-size", "384"] + argv)
    return rc, capsys.readouterr()


def test_random_prompts_summary_and_json(tok_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    with FakeServe(tok_dir, tokens_per_request=8) as srv:
        rc, cap = _bench(["--url", srv.url, "--input-len", "20", "--output-len", "5", "--num-prompts", "12",
                          "--rate", "inf", "--goodput", "ttft:60000", "tpot:60000", "--save-result", str(out),
                          "--save-detailed"], capsys)
        served = srv.aeng.num_finished
    assert rc == 0 and served == 12
    assert "Serving Benchmark Result" in cap.out and "Successful requests:                     12" in cap.out
    d = json.loads(out.read_text())
    assert (d["completed"], d["failed"], d["model_id"]) == (12, 0, "fake-model")
    assert d["total_input_tokens"] == 12 * 20 and d["total_output_tokens"] == 12 * 5     # usage: exact
    assert d["output_lens"] == [5] * 12 and d["input_lens"] == [20] * 12 and len(d["itls"]) == 12
    assert d["request_goodput"] == pytest.approx(12 / d["duration"]) and d["slo_attainment"] == 1.0
    assert d["request_rate"] is None and d["goodput_slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}


def test_trace_replay_has_the_trace_lengths(tok_dir, tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(
        f"2023-11-16 18:15:{40 + i:02d}.000,{10 + 3 * i},{1 + i % 6}" for i in range(10)) + "\n")
    out = tmp_path / "r.json"
    with FakeServe(tok_dir, tokens_per_request=8) as srv:
        rc, cap = _bench(["--url", srv.url + "/v1", "--trace", str(csv), "--rate", "50", "--max-concurrency", "3",
                          "--save-result", str(out), "--save-detailed"], capsys)
    d = json.loads(out.read_text())
    assert rc == 0 and d["completed"] == 10 and d["max_concurrency"] == 3 and d["max_concurrent_requests"] <= 3
    assert d["input_lens"] == [10 + 3 * i for i in range(10)] and d["output_lens"] == [1 + i % 6 for i in range(10)]
    assert "Maximum request concurrency:             3" in cap.out


def test_dataset_over_chat_and_failures_counted(tok_dir, tmp_path, capsys):
    ds = tmp_path / "p.jsonl"
    ds.write_text("\n".join(json.dumps({"prompt": f"t{5 + i} t{9 + i}"}) for i in range(4)) + "\n")
    out = tmp_path / "r.json"
    with FakeServe(tok_dir, tokens_per_request=3) as srv:
        rc, _ = _bench(["--url", srv.url, "--endpoint", "chat", "--dataset", str(ds), "--output-len", "6",
                        "--num-prompts", "6", "--save-result", str(out)], capsys)
        ok = json.loads(out.read_text())
        # a prompt longer than the server's context: every request is a 400, counted, and the run still ends
        rc_bad, cap = _bench(["--url", srv.url, "--input-len", "600", "--output-len", "4", "--num-prompts", "3",
                              "--save-result", str(out)], capsys)
    assert rc == 0 and ok["completed"] == 6 and ok["total_output_tokens"] == 6 * 3   # FakeEngine stops at 3
    bad = json.loads(out.read_text())
    assert rc_bad == 1 and bad["failed"] == 3 and bad["completed"] == 0
    assert list(bad["error_counts"].values()) == [3] and "HTTP 400" in next(iter(bad["error_counts"]))
    assert "Failed requests:                         3" in cap.out


def test_unreachable_server_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        _bench(["--url", "http://127.0.0.1:9", "--num-prompts", "1"], capsys)
    assert "could not list models" in str(e.value)


def test_hf_baseline_server_streams_exact_lengths(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import hf_server
    from router.fake_engine import write_word_tokenizer
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=384, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_word_tokenizer(str(tmp_path), 384)
    model = hf_server.load_model(str(tmp_path), "dummy", "cpu", "float32")

    async def go():
        from aiohttp import web
        from tokenizers import Tokenizer
        srv = hf_server.HFServer(model, Tokenizer.from_file(str(tmp_path / "tokenizer.json")), "tiny", "cpu")
        runner = web.AppRunner(srv.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            reqs = [loadgen.BenchRequest([5 + i] * (8 + i), 6, 0.0, 8 + i) for i in range(3)]
            out = await loadgen.run(reqs, loadgen.Target(url, await loadgen.fetch_model(url)))
        finally:
            await runner.cleanup()
        return out, srv
    out, srv = asyncio.run(go())
    assert [r.ok for r in out.results] == [True] * 3 and [r.output_len for r in out.results] == [6] * 3
    assert all(len(r.itl) == 5 for r in out.results)          # one SSE chunk per token
    assert srv.served == 3 and srv.busy_s > 0
