"""Backends: each implements the ops of uxnet_kernels for some devices and dtypes (see base.Backend)."""
