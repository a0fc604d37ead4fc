"""The Spark session and Parquet IO: with manifest/ and pca/, the only code that imports Spark."""
