"""Broker adapters shipped with mqkit, one module or package per backend.

Each is a thin transport implementing :mod:`mqkit.seam`; it is imported only when a URL of its
scheme is used.
"""
