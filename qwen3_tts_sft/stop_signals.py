"""The signals that stop a run: here alone, importing nothing heavy, so the trainer takes them over
before it imports torch (sft_12hz_chatterbox.StopAtOnce)."""

import signal

# What a scheduler (Slurm preemption, `timeout`) or Ctrl-C sends to stop a job. They are the main
# process's to handle (sft_12hz_chatterbox.StopRequest: finish the step, save, exit), also when they
# are sent to every process of the job, the data workers included (training_run.leave_stop_signals_to_main).
# SIGUSR1: what Slurm's --signal=USR1@SECONDS sends ahead of the time limit; left alone it kills at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
