"""Tiny models of real architectures that GenMLX writes itself, for the offline demo, tests and
benchmarks: random weights (``random_model``) or weights that write a given text (``scripted_model``).
"""
