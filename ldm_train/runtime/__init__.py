"""What both trainers (and eval) share about the process they run in: ranks, devices and process groups
(``distributed``), run directories (``rundir``), preemption signals and SLURM requeue (``preemption``)."""
