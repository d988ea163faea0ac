"""Benchmarks: SRDS (plain, pipelined) against serial DDIM and ParaDiGMS. `python -m benchmarks.run --help`."""
