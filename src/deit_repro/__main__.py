from deit_repro.cli import entry

entry()
