"""The parts of `tools/repro_report.py`, one job each.

grid      what is trained: the paper's conditions, the reduced scale, one job per condition and seed
run       the dataset, the training processes (reused when finished) and their evaluation
collect   per-run numbers and their spread over seeds, per condition
verdicts  each claim of the paper against those numbers, by stated rules
plots     the figures
render    the Markdown report and results.json
"""
