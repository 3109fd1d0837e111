"""Test-wide settings: one intra-op thread, so that tests run in parallel with other work on a small
machine do not oversubscribe its cores (tiny CPU kernels slow down by orders of magnitude then)."""
import torch

torch.set_num_threads(1)
