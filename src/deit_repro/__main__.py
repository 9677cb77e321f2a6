from deit_repro.run.cli import entry

entry()
