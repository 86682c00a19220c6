"""Test-wide settings: one torch thread (tests run beside other work on small shared CPUs, where more threads
are slower, and single-threaded kernels keep seeded results identical run to run)."""

import os

import torch

torch.set_num_threads(int(os.environ.get("MELODJINN_TEST_THREADS", "1")))
