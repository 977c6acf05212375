"""Experiments: one command each, printing and writing its results table and plot."""
