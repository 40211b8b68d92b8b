"""Downstream side of the engine: datasets in published layouts, evaluation protocols and metrics.

Knows nothing about pretext tasks or curricula.
"""
