"""Causal sequence localization: a tracker per stream or session over the index's candidates."""
