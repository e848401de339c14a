"""Capacity planning: a performance model (measured or analytic), a discrete-event simulator
that drives the real router policy, scheduler and block manager, and a search over deployments.

    perf_model.py   step / codec / transfer times: ProfileModel (disagg profile) or RooflineModel
    gpus.py         datasheet figures for the roofline model
    profile.py      `disagg profile`: measures a ProfileModel's tables on a GPU
    workers.py      simulated workers (real Scheduler + BlockManager on a simulated clock)
    simulator.py    the event loop and the router
    report.py       vllm-bench-serve-like summary, JSON, plots
    plan.py         `disagg plan`: the fewest GPUs that meet an SLO
    cli.py          `disagg profile | simulate | plan`
"""
