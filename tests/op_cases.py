"""Sample inputs of the ops: moved to tests/ops/samples.py (one place for every op test). Kept as a re-export for
tests outside tests/ops that import it (tests/test_integration.py)."""

from ops.samples import KERNELS, SHAPE, dwconv3d_args, layer_norm_args, upcast, ux_mlp_args  # noqa: F401
