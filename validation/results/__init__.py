"""docs/results.md, written from the result files the stages leave (validate, benchmark, compat)."""
