"""The op families: one module per op, holding all of it but its kernels.

Each module, named after its op, has in this order: the reference (pure PyTorch, the ground truth of every test), the
argument checks, the fake implementations and the autograd rule of its compiled (``torch.ops.uxnet.<op>``) and
Triton (``torch.ops.uxnet.<op>_triton``) operators, the table of implementations per backend
(:class:`uxnet_kernels.dispatch.OpFamily`), and the public function with its docstring and autocast policy.
Helpers that several families share are in :mod:`uxnet_kernels.ops.common`.
"""
