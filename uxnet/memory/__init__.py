"""The memory of one training step: predicted without allocating it (``planner``, printed by ``report``; with the
CPU convolutions' scratch from ``conv_workspace``), and measured (``measure``, with the peak tracker of ``tracker``).
``step`` defines the step both run: the model (uxnet or official), batch, optimizer and autocast."""
