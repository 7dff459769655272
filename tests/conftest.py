import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before
# triton is first imported (tests import it lazily, through the backend registry).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
