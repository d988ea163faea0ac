"""sampler="auto": choose among serial, SRDS and the window samplers from a measured latency-per-rows curve.

    pricing.py   pure: each candidate's predicted time from the curve, the expected iterations / sweeps
    latency.py   measuring curves (engine buckets, the reference model, all-gathers)
    planner.py   AutoPlanner: what the pipeline calls (choose, observe) and the bounded state it keeps
"""

from .pricing import CANDIDATES, Candidate, Choice, candidate_key, choose, runnable_choice, widest_rows

__all__ = ["CANDIDATES", "Candidate", "Choice", "candidate_key", "choose", "runnable_choice", "widest_rows"]
