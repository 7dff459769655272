"""``python -m gemini_kernels``: the environment report of :mod:`gemini_kernels.info`."""
import sys

from .info import main

sys.exit(main())
