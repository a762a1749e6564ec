"""Test-session setup shared by every test file."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be chosen before any
# kernel module is imported, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
