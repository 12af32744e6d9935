"""CUDA graphs for training: each micro-batch's forward and backward launched as one recorded graph.

Why: with the layers compiled, a 1.7B micro-batch still costs about 130 ms of Python and kernel
launches on the host, whatever its size, so at batch 4 the GPU waits for the host most of the step.
A CUDA graph replays the thousands of kernels of a forward and backward with one launch.

How:
- A graph holds fixed shapes, so there is one per batch shape. The collate pads every length to a
  multiple of 8 and the target counts to a multiple of 32, so a dataset has a few dozen shapes, and
  a 10 s-clip dataset a handful.
- The first micro-batch of a shape runs as usual: that compiles the layers for it if they need
  compiling, and sets up whatever is set up on first use, none of which can happen inside a
  recording. The next one after the first optimizer step is recorded, then replayed (recording
  only records: every micro-batch trains once); later ones copy their tensors into the graph's
  input buffers and replay.
- A recording that fails leaves CUDA's random-number generator and memory allocator in recording
  mode, so the run cannot go on: it stops with a message that says to resume with --cuda_graphs no.
- The loss weights (1 / targets in the whole step) change from step to step, so they are an input
  of the graph too, like the batch.
- Gradients accumulate in place into each parameter's `.grad`, whose memory the graph has
  recorded: the gradients must exist before recording and be zeroed, never freed, after each
  optimizer step. A replay checks that they are still the recorded tensors.
- All graphs share one memory pool, about one micro-batch's activations. That is safe because they
  never run at the same time and none keeps a tensor alive between replays except its two loss
  sums, read before the next replay. A shape's first (eager) run needs its activations beside the
  pool: graphs cost up to one micro-batch's activations of extra memory. Where the GPU lacks that
  room, the graphs are dropped after the first recording (see MicroBatchGraphs).

Works on one CUDA device with the speaker encoder frozen (a trained speaker encoder re-reads its
reference mels from host memory in every forward, which a graph cannot hold) and without gradient
checkpointing (its recomputation saves the random-number state on the host).
"""

import torch
from tqdm.auto import tqdm

from qwen3_tts_sft.sequence_layout import TalkerBatch


def forward_backward(module, batch: TalkerBatch, loss_weights: torch.Tensor, backward) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its loss sums [group 0, code predictor].

    The loss is the weighted sum of the two summed cross-entropies; `loss_weights` holds
    1 / (targets of that kind in the whole step), times the code predictor's weight for the second.
    """
    out = module(batch)
    loss_sums = torch.stack([out.codec0_loss_sum, out.sub_talker_loss_sum])
    backward((loss_sums * loss_weights).sum())
    return loss_sums.detach()


def batch_shape(batch: TalkerBatch) -> tuple:
    return tuple(tuple(value.shape) for value in vars(batch).values())


class RecordedMicroBatch:
    """One recorded graph, the input buffers it reads and the loss sums it writes."""

    def __init__(self, graph, batch: TalkerBatch, loss_weights: torch.Tensor, loss_sums: torch.Tensor):
        self.graph = graph
        self.batch = batch
        self.loss_weights = loss_weights
        self.loss_sums = loss_sums

    def replay(self, batch: TalkerBatch, loss_weights: torch.Tensor) -> torch.Tensor:
        for name, buffer in vars(self.batch).items():
            buffer.copy_(getattr(batch, name), non_blocking=True)
        self.loss_weights.copy_(loss_weights, non_blocking=True)
        self.graph.replay()
        return self.loss_sums


class MicroBatchGraphs:
    """Runs micro-batches through per-shape CUDA graphs.

    With `check_memory`, the first recording (after the first optimizer step, once the optimizer
    state exists) measures the graphs' pool; if the GPU has no room beside it for another
    micro-batch's activations, the graphs are dropped and training goes on without them.
    """

    def __init__(self, module, trainable: list, backward, check_memory: bool = True):
        self.module = module
        self.trainable = trainable
        self.backward = backward
        self.check_memory = check_memory
        self.enabled = True
        self.optimizer_has_stepped = False  # set by the loop: from then on the memory in use is the run's
        self.recorded = {}       # batch shape -> RecordedMicroBatch
        self.warmed_up = set()   # shapes that have run once as usual
        self.pool = torch.cuda.graph_pool_handle()
        self.gradients = None    # the .grad tensors the graphs write, fixed at the first recording

    def forward_backward(self, batch: TalkerBatch, loss_weights: torch.Tensor) -> torch.Tensor:
        """Like forward_backward(); `batch` may be on the host. The returned sums are valid until
        the next call: add them up before calling again."""
        shape = batch_shape(batch)
        recorded = self.recorded.get(shape)
        if recorded is not None:
            self.check_gradients()
            return recorded.replay(batch, loss_weights)
        batch = batch.to(loss_weights.device)
        if not (self.enabled and self.optimizer_has_stepped and shape in self.warmed_up):
            self.warmed_up.add(shape)
            return forward_backward(self.module, batch, loss_weights, self.backward)
        measure = self.check_memory and not self.recorded  # the first recording sizes the pool
        if measure:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            reserved_before = torch.cuda.memory_reserved()
        recorded = self.recorded[shape] = self.record(shape, batch, loss_weights.clone())
        recorded.graph.replay()  # recording only records: this runs the micro-batch
        if measure:
            self.drop_if_no_room(pool_bytes=torch.cuda.memory_reserved() - reserved_before)
        return recorded.loss_sums

    def drop_if_no_room(self, pool_bytes: int):
        """Drop the graphs if a new shape's first run (about the pool's size again) would not fit."""
        free = torch.cuda.mem_get_info()[0]
        if free >= 1.2 * pool_bytes:
            return
        self.recorded.clear()
        self.enabled = False
        tqdm.write(f"CUDA graphs off: they take {pool_bytes / 1e9:.1f} GB, and the {free / 1e9:.1f} GB left would not "
                   f"hold a new batch shape's first run beside them; training goes on without them "
                   f"(--cuda_graphs yes keeps them)")

    def record(self, shape: tuple, batch: TalkerBatch, loss_weights: torch.Tensor) -> RecordedMicroBatch:
        """Record the graph of `shape`, with `batch` and `loss_weights` as its input buffers."""
        if self.gradients is None:
            for parameter in self.trainable:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            self.gradients = [parameter.grad for parameter in self.trainable]
        self.check_gradients()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's pin-memory thread makes CUDA calls meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss_sums = forward_backward(self.module, batch, loss_weights, self.backward)
        except RuntimeError as error:
            raise RuntimeError(
                f"recording the CUDA graph of a micro-batch of shape {shape[0]} failed, which leaves CUDA unusable "
                f"in this process. Resume from the last checkpoint with --cuda_graphs no "
                f"(--resume_from_checkpoint latest). The error was: {error}") from error
        return RecordedMicroBatch(graph, batch, loss_weights, loss_sums)

    def check_gradients(self):
        if self.gradients is None:
            return
        for parameter, gradient in zip(self.trainable, self.gradients):
            if parameter.grad is not gradient:
                raise RuntimeError(
                    "a parameter's .grad was replaced after the CUDA graphs recorded it (zero_grad must "
                    "keep the tensors: set_to_none=False); the graphs would write to freed memory")
