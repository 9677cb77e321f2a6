"""One module per DAG stage, with the rules of the stage that change its numbers (which runs a
stage trains, the distillation token's ``auto``, the thread count). Each is the code dep of its
own stages in dvc.yaml, beside ``core/`` and ``data/``; ``deit_repro.code_deps.COMPUTED_BY`` maps
stage names to these modules."""
