"""A Triton model repository for an export (repo.py: the UNet plan + the sampler model) and the sampler model that
Triton's Python backend runs (sampler.py)."""
