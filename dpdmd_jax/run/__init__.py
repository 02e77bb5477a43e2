"""Assembling and running a distillation run: preflight, setup (build -> Run), workdir, train, and the
jobs behind the sample and export commands (docs/DESIGN.md, "Layers")."""
