"""Data for `dalle`: the built-in shapes world (:mod:`dalle.data.shapes`) and caption/image datasets.

Kept empty on purpose: importing ``dalle.data`` must stay cheap, so each submodule is imported by name.
"""
