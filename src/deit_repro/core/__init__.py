"""What computes: models, losses, positional-embedding resampling, batches, the training engine,
prepared datasets, model directories and run records. Every file here can change a number: the
folder is a code dep of every stage that trains or evaluates (dvc.yaml)."""
