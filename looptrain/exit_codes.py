"""Process exit statuses that launchers act on (documented in the README)."""

OK = 0
FAILED = 1  # an error: not requeued
BAD_INPUT = 2  # a recipe, data or checkpoint problem named on stderr: not requeued
HALTED = 17  # the norm monitor halted a diverging run: never requeued, not auto-resumed
PREEMPTED = 18  # checkpointed on SIGTERM/SIGUSR2 before a time limit or preemption: requeue
CANCELLED = 19  # stopped by Ctrl-C (SIGINT) at a step boundary and checkpointed: not a failure, not requeued

# How each status reads in `looptrain status`, W&B summaries and the attempt records.
OUTCOMES = {OK: "finished", HALTED: "halted", PREEMPTED: "preempted", CANCELLED: "cancelled"}
