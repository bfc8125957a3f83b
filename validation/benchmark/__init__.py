"""`python -m validation.benchmark`: latency, memory and size of every converted file, in ratios."""
