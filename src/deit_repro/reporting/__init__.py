"""The paper's tables, figures and claims, regenerated from the metrics of a run of the DAG: every
measured number is read from a file under ``metrics/`` and set beside the paper's number from
``reference/paper/``, each cell naming its source (``results/provenance.json``). This package is
the code dependency of the ``tables`` stage of dvc.yaml, whose entry point is
:func:`deit_repro.reporting.report.run_tables`; it re-exports nothing, so importing one module
(e.g. :mod:`deit_repro.reporting.trace`) loads only what that module needs.
"""
