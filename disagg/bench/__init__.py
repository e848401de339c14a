"""`disagg bench`: an open-loop load generator for any OpenAI-compatible endpoint.

    workload.py   what to send: trace replays (token-id prompts of exact lengths) or a prompt file
    loadgen.py    how to send it: arrivals on schedule, streaming, per-request timings, progress bar
    summary.py    what it means: vllm-bench-serve metrics (TTFT, TPOT, ITL, E2EL, goodput) and JSON
    cli.py        the `disagg bench` subcommand

Only the standard library and aiohttp are imported: the load generator runs on a client
machine with neither torch nor the engine installed.
"""
