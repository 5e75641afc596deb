"""Batches on Ray: ``python -m it3d.batch`` runs a method on a folder of inputs, one Ray task per input."""
