"""Importable runs: the demo, the paper's reproduction, the tiny SAM's pretraining.

A recipe composes the engine, inference, models and data sets into one run and returns its
results (dataclasses, dicts, tables as strings); the tools in ``tools/`` parse the command line,
call a recipe and print what it returns. No recipe parses arguments, prints or exits.

Modules are imported by name (``from dessam_d2.recipes.demo import run_demo``): this package
imports nothing at import, so a tool's ``--help`` needs no torch.
"""
