"""Explaining predictions: Grad-CAM maps (:mod:`.gradcam`), their overlays and files
(:mod:`.render`), and their scores against bounding boxes (:mod:`.localize`)."""
