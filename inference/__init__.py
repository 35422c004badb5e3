"""Model-side maths of fracnode: pixels, routing tables, models, calibration, training, evaluation.

This package never imports ``node`` or ``storage`` and never sees a pydicom Dataset: the node
hands it numpy arrays and the frozen values of :mod:`inference.values`.
"""
