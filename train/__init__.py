"""Degradation, dataset readers, losses, distillation, evaluation, heatmaps.

Imports `model/` and `index/`.
"""
