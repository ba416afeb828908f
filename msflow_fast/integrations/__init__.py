"""Integrations with other frameworks, each in its own subpackage and importing that framework only
there: :mod:`msflow_fast.integrations.anomalib`. Importing this package imports nothing else."""
