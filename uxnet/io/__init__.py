"""Model files: the uxnet checkpoint format (``checkpoint``) and inference export (``export``)."""
