"""Op-level benchmarks: dwconv3d (forward, forward+backward; UX-Net stage shapes, k in {3, 7, 13, 21}, and the
CPU-kernel issue's cases), layer_norm_channels_first, ux_mlp, and the decoder's instance_norm_lrelu and
instance_norm_add_lrelu (residual; 48 channels at the patch size), for every fast backend of the device against the
PyTorch reference in NCDHW and channels_last_3d. Cases: uxnet/bench/op_cases.py (sizes: uxnet/bench/presets.py)."""


def test_op(run_case, op_case):
    run_case(op_case)
