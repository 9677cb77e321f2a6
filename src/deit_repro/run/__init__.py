"""Orchestration: the ``deit-repro`` CLI, the launchers (forked seeds, submitit on this machine
or on SLURM) and the fork server. Nothing here changes a number, and no stage depends on it:
an edit here never touches dvc.lock."""
