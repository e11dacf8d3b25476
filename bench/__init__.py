"""Benchmarks that publish the numbers of README.md and docs/ (bench.report renders them); each module says the command that runs it."""
