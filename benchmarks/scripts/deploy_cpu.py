"""CPU deployment routes of 3D UX-Net side by side (``uxnet.bench.deploy``; also ``uxnet bench --inference``).

    python benchmarks/scripts/deploy_cpu.py [--size 96] [--threads 2] [--rounds 5] [--routes ...] [--json deploy.json]
"""

import contextlib
import sys

from uxnet.bench.deploy import main

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
