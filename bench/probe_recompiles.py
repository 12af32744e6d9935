"""Why a compiled layer compiles more than once: runs bench.py (same arguments) with every
torch.set_num_threads call logged with its stack, and, each time a layer that recomputes its
activations runs (the forward on the main thread, the recomputation on autograd's device thread),
the thread, its CPU thread count and grad mode printed. Run it with TORCH_LOGS=recompiles_verbose:

    TORCH_LOGS=recompiles_verbose python bench/probe_recompiles.py --size tiny --warmup 1 --steps 1 \\
      --clips 16 --work_dir /tmp/probe --trainer_flags=--low_memory

(bench_notes.md, fifteenth session: the code predictor's layer compiles twice under --low_memory
on a GPU, the guard naming the thread count.)
"""

import runpy
import sys
import threading
import traceback
from pathlib import Path

import torch
import torch.utils.checkpoint

LAYER_RUNS_SHOWN = 8

print(f"main thread: {torch.get_num_threads()} CPU threads at start", flush=True)
set_num_threads = torch.set_num_threads


def logged_set_num_threads(count):
    print(f"torch.set_num_threads({count}) on {threading.current_thread().name}, from:", flush=True)
    traceback.print_stack(limit=8)
    set_num_threads(count)


checkpoint = torch.utils.checkpoint.checkpoint
layer_runs = 0


def checkpoint_that_says_where_it_runs(function, *args, **kwargs):
    def run(*inputs, **options):
        global layer_runs
        if layer_runs < LAYER_RUNS_SHOWN:
            layer_runs += 1
            print(f"recomputed layer on {threading.current_thread().name}: {torch.get_num_threads()} CPU threads, "
                  f"grad {torch.is_grad_enabled()}", flush=True)
        return function(*inputs, **options)
    return checkpoint(run, *args, **kwargs)


# Replaced before transformers is imported, so that its gradient checkpointing calls these.
torch.set_num_threads = logged_set_num_threads
torch.utils.checkpoint.checkpoint = checkpoint_that_says_where_it_runs
bench = Path(__file__).with_name("bench.py")
sys.argv = [str(bench)] + sys.argv[1:]
runpy.run_path(str(bench), run_name="__main__")
