"""One module per ``rlfb`` sub-command; see :mod:`rlfb.cli`."""
