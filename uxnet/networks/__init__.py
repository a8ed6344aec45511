"""The network (``nets``), the blocks it is built of (``blocks``), and the tools over a built network: activation
checkpointing, re-parameterisation and kernel growth."""
