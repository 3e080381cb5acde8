"""The shared run machinery of both trainers: the `train:` config, the run skeleton
(run folder rules, Accelerator, resume, the step loop and its cadence, summary) and
atomic checkpoints."""
