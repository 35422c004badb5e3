"""One module per ``fracnode`` command (see :mod:`node.cli`)."""
