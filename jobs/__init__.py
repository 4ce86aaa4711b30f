"""Entry points for jobs (`python -m jobs.<name>`): parse arguments, read data, call the pipelines, write."""
