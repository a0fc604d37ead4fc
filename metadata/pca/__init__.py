"""Join-back and PCA on Spark: the job, the fit, plots, the CLI."""
