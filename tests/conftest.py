"""Session set-up shared by every test file.

Without a GPU, the Triton kernels are tested in Triton's interpreter. Triton reads TRITON_INTERPRET when it
is first imported (its own `triton.language` helpers are decorated then), and the reference libraries import
it early (`import peft, transformers` does), so a test file that imports them at the top, collected before
tests/test_kernels_nf4.py, would leave the kernels compiled for a GPU that is not there. The variable is
therefore set here, before any test module is collected. With a CUDA GPU the kernels compile for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
