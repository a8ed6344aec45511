"""The timing harness of this checkout (uxnet/timing.py), loaded on its own: ``from checkout_timing import timing``.

The CPU scripts here measure whichever build of uxnet_kernels PYTHONPATH names (cpu_ab.py runs them against two
builds) or ``--library`` loads. Importing the uxnet package would import uxnet_kernels along with it, so the one
file is loaded by path; it imports nothing but torch.
"""

import importlib.util
import os
import sys

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "uxnet", "timing.py")


def _load():
    spec = importlib.util.spec_from_file_location("uxnet_checkout_timing", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the defining module up there
    spec.loader.exec_module(module)
    return module


timing = _load()
