"""``uxnet train``: training UXNet on a folder of NIfTI volumes with MONAI (issue 22).

One job per module: ``data`` (finding and checking the dataset, splits), ``recipe`` (the MONAI transform chains),
``plan`` (batch / ROI / checkpointing from the memory prediction), ``checkpoint`` (resumable ``last.pt``, ``best.pt``,
finetune initialisation), ``validate`` (sliding-window Dice), ``log`` (CSV, TensorBoard, progress) and ``loop``
(the training loop, AMP, compile, deep supervision, DDP). ``uxnet/commands/train.py`` is the command line.
"""


class TrainError(ValueError):
    """Bad input to ``uxnet train`` (dataset, options, resume directory): the message says what and where."""


__all__ = ["TrainError"]
