"""CUDA graphs for training: each micro-batch's forward and backward launched as one recorded graph.

Why: with the layers compiled, a 1.7B micro-batch still costs about 130 ms of Python and kernel
launches on the host, whatever its size, so at batch 4 the GPU waits for the host most of the step.
A CUDA graph replays the thousands of kernels of a forward and backward with one launch.

How:
- A graph holds fixed shapes, so there is one per batch shape. The plan pads micro-batches to a
  small table of sizes chosen from the data (training_data.choose_batch_shapes), so a dataset of
  2-15 s clips has about ten shapes.
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
  recorded: the gradients are made before the first run and zeroed, never freed, after each
  optimizer step. A replay checks that they are still the recorded tensors.
- All graphs share one memory pool, about one micro-batch's activations. That is safe because they
  never run at the same time and none keeps a tensor alive between replays except its two loss
  sums, read before the next replay. A shape's first run uses that pool too (on the recording
  stream, whose freed blocks the pool hands out again): its activations take the memory the
  graphs use between replays instead of sitting beside it, so the graphs cost about no memory
  beyond what training without them caches. Should a first run leave memory allocated in the pool
  (a tensor kept for later, as a recompile's constants), the graphs recorded before it may use
  that memory between replays: they are forgotten and recorded again when their shape returns.
- The pool is held for the whole run, where training without graphs gives its cached memory
  back when something else needs it; where the GPU has little room left beside the pool, the
  graphs are dropped after the first recording (see MicroBatchGraphs).

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
    loss_sums = torch.stack([out.codec0_loss_sum, out.code_predictor_loss_sum])
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
    state exists) measures the graphs' pool; if the GPU has less than a quarter of it left free,
    for a longer batch than any seen yet (the pool grows) and for what runs beside the graphs
    (evaluation, saving a checkpoint), the graphs are dropped and training goes on without them.
    """

    def __init__(self, module, trainable: list, backward, check_memory: bool = True):
        self.module = module
        self.trainable = trainable
        self.backward = backward
        self.check_memory = check_memory
        self.enabled = True
        self.optimizer_has_stepped = False  # set by the loop: from then on the memory in use is the run's
        self.recorded = {}       # batch shape -> RecordedMicroBatch
        self.recordings = 0      # graphs recorded so far, a shape recorded again counted again
        self.warmed_up = set()   # shapes that have run once as usual
        self.pool = torch.cuda.MemPool()  # every graph's memory, and every first run's
        self.stream = torch.cuda.Stream()  # where graphs are recorded and first runs run: the pool's blocks belong to it
        self.first_run_sums = None  # a first run's loss sums, outside the pool
        self.gradients = None    # the .grad tensors the graphs write, made before the first run

    def forward_backward(self, batch: TalkerBatch, loss_weights: torch.Tensor) -> torch.Tensor:
        """Like forward_backward(); `batch` may be on the host. The returned sums are valid until
        the next call: add them up before calling again."""
        shape = batch_shape(batch)
        recorded = self.recorded.get(shape)
        if recorded is not None:
            self.check_gradients()
            return recorded.replay(batch, loss_weights)
        batch = batch.to(loss_weights.device)
        if not self.enabled:
            return forward_backward(self.module, batch, loss_weights, self.backward)
        if not (self.optimizer_has_stepped and shape in self.warmed_up):
            self.warmed_up.add(shape)
            return self.first_run(batch, loss_weights)
        first_recording = not self.recorded
        recorded = self.recorded[shape] = self.record(shape, batch, loss_weights.clone())
        recorded.graph.replay()  # recording only records: this runs the micro-batch
        if first_recording and self.check_memory:
            self.drop_if_no_room()
        return recorded.loss_sums

    def first_run(self, batch: TalkerBatch, loss_weights: torch.Tensor) -> torch.Tensor:
        """A shape's first micro-batch, run as usual but on the recording stream, with its memory
        taken from the graphs' pool."""
        self.make_gradients()
        if self.first_run_sums is None:
            self.first_run_sums = torch.zeros(2, device=loss_weights.device)
        # While allocations go to the pool, a short allocation cannot free the default pool's cached
        # blocks: give them back first.
        torch.cuda.empty_cache()
        allocated_before = self.pool_bytes("allocated_size")
        device = loss_weights.device.index
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            # Every allocation on this stream, from any thread (the backward runs in autograd's own).
            torch._C._cuda_beginAllocateCurrentStreamToPool(device, self.pool.id)
            try:
                self.first_run_sums.copy_(forward_backward(self.module, batch, loss_weights, self.backward))
            finally:
                torch._C._cuda_endAllocateToPool(device, self.pool.id)
                torch._C._cuda_releasePool(device, self.pool.id)
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.recorded and self.pool_bytes("allocated_size") > allocated_before:
            tqdm.write(f"CUDA graphs: the first run of a batch shape kept memory in the graphs' pool; the "
                       f"{len(self.recorded)} graphs recorded so far are recorded again when their shape returns")
            torch.cuda.synchronize()  # no graph may be running when it is destroyed
            self.recorded.clear()
        return self.first_run_sums

    def pool_bytes(self, kind: str) -> int:
        """The pool's "total_size" (reserved) or "allocated_size" (in use), from the allocator's snapshot."""
        return sum(segment[kind] for segment in torch.cuda.memory_snapshot()
                   if tuple(segment["segment_pool_id"]) == tuple(self.pool.id))

    def drop_if_no_room(self):
        """Drop the graphs if the GPU has less than a quarter of their pool left free."""
        pool_bytes = self.pool_bytes("total_size")
        free = torch.cuda.mem_get_info()[0]
        if free >= 0.25 * pool_bytes:
            return
        torch.cuda.synchronize()  # no graph may be running when it is destroyed
        self.recorded.clear()
        self.enabled = False
        self.pool = None  # its memory goes back to training without graphs
        torch.cuda.empty_cache()
        tqdm.write(f"CUDA graphs off: they hold {pool_bytes / 1e9:.1f} GB, and the {free / 1e9:.1f} GB left would not "
                   f"hold a longer batch or what runs beside them; training goes on without them "
                   f"(--cuda_graphs yes keeps them)")

    def record(self, shape: tuple, batch: TalkerBatch, loss_weights: torch.Tensor) -> RecordedMicroBatch:
        """Record the graph of `shape`, with `batch` and `loss_weights` as its input buffers."""
        self.make_gradients()
        self.check_gradients()
        self.recordings += 1
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's pin-memory thread makes CUDA calls meanwhile.
            with torch.cuda.graph(graph, pool=self.pool.id, stream=self.stream, capture_error_mode="thread_local"):
                loss_sums = forward_backward(self.module, batch, loss_weights, self.backward)
        except RuntimeError as error:
            raise RuntimeError(
                f"recording the CUDA graph of a micro-batch of shape {shape[0]} failed, which leaves CUDA unusable "
                f"in this process. Resume from the last checkpoint with --cuda_graphs no "
                f"(--resume_from_checkpoint latest). The error was: {error}") from error
        return RecordedMicroBatch(graph, batch, loss_weights, loss_sums)

    def make_gradients(self):
        """Give every trained parameter its .grad (zeros) before anything runs in the pool, so none
        is made there, and fix them: the graphs write into these tensors."""
        if self.gradients is None:
            for parameter in self.trainable:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            self.gradients = [parameter.grad for parameter in self.trainable]

    def check_gradients(self):
        if self.gradients is None:
            return
        for parameter, gradient in zip(self.trainable, self.gradients):
            if parameter.grad is not gradient:
                raise RuntimeError(
                    "a parameter's .grad was replaced after the CUDA graphs recorded it (zero_grad must "
                    "keep the tensors: set_to_none=False); the graphs would write to freed memory")
