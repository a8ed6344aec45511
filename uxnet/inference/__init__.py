"""Inference on NIfTI volumes: sliding-window segmentation (``segment``) on the model grid (``resampling``), and
per-class Dice and HD95 of label maps (``evaluation``)."""
