"""Evaluation of fracture models on labelled data: metrics with confidence intervals, detector
metrics, study aggregation, the cross-region transfer matrix, Grad-CAM and the report.

The pure parts (``metrics``, ``detection``, ``aggregate``, ``matrix``) need only numpy and
scipy; ``runner`` and ``gradcam`` run the node's own model objects; ``report`` draws with
matplotlib's Agg backend.
"""
