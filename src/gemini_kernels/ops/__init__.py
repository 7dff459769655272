"""One module per backend: its kernels, launch code, autograd.Function and an ``unavailable_reason``."""
