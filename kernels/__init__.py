"""minift.kernels: Triton GPU kernels, each beside its pure-torch reference.

Every kernel here is a set of four (DESIGN.md, principle 2): a pure-torch `<op>_reference` that is the
spec and the CPU fallback, the Triton kernel with its launcher and autograd.Function, a test on irregular
shapes (run on the CPU under TRITON_INTERPRET=1), and a benchmark against torch and the reference library.
Nothing is decided at import time: Triton is imported lazily, only when a kernel is launched.
"""
