"""Test session set-up shared by every module."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before any module defines
# a kernel, and the first module to import the kernels may be any test module, so it is set here.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
