"""AdamW for a model whose weights are bf16, in one of two ways.

Plain bf16 would lose the updates: bf16 keeps 8 significant bits, so a weight of 0.02 moves in
steps of ~1e-4 and an update of lr 5e-5 times a unit-sized Adam step rounds back to the old value.

- `fp32_master` (the default on one GPU, `--bf16_weights`): the optimizer keeps an fp32 master
  copy of every trained weight and fp32 moments; the update is computed on the master, and the
  bf16 weight the forward and backward use is the master rounded to nearest. Per trained weight:
  2 bytes of weight, 2 of gradient, 12 of optimizer state, as many as fp32 weights with fp32 AdamW
  (4 + 4 + 8), but every pass of the forward and backward reads bf16 weights and writes bf16
  gradients, with no casts.
- Without it (`--low_memory`): weights, gradients and moments all bf16, 8 bytes per trained weight
  (~13 GB for 1.7B). The new weight (and moment) is computed in fp32 and rounded *stochastically*
  to bf16: up with probability equal to the fraction dropped, so each rounding is exact on average
  and small updates add up over steps as they would in fp32.
"""

import torch

# Rounding keys are below 2**24, so that they ride exactly in a float32 row beside the step's numbers.
KEY_LIMIT = 1 << 24
# Hyperparameter row of one tensor for one step: the update reads its numbers from here.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, CORRECTION1, CORRECTION2, KEY = range(8)


def rounding_noise(values: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """16 pseudo-random bits per element of `values` (int32 in [0, 2**16)), a function of the
    element's index and `key` only (an integer below 2**24 held in a tensor of any dtype).

    A counter-based generator: each index, offset by the key, goes through an integer hash (two
    xor-shift-multiply rounds, a bijection of 32-bit values), so the noise needs no random-number
    state: a recorded CUDA graph gets new noise from a new key, and every data-parallel process
    draws the same noise from the same key.
    """
    mask = 0xFFFFFFFF
    index = torch.arange(values.numel(), device=values.device, dtype=torch.int64).view(values.shape)
    # The key is added before the first multiply: a multiply of the bare index lets inductor fold it
    # into the kernel's int32 index arithmetic, where 0x9E3779B1 does not fit (Triton refuses it).
    x = (((index + key.to(torch.int64) * 0x85EBCA77) & mask) * 0x9E3779B1) & mask
    x = (((x >> 16) ^ x) * 0x045D9F3B) & mask
    x = (((x >> 16) ^ x) * 0x045D9F3B) & mask
    return (((x >> 16) ^ x) & 0xFFFF).to(torch.int32)


def round_to_bf16_stochastically(values: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, unbiased: E[result] = values, over keys.

    bf16 is the top 16 bits of fp32. Adding a uniform random number below 2^16 to the bit pattern
    and dropping the low 16 bits rounds the magnitude up exactly when the noise exceeds the
    dropped bits' complement, i.e. with probability (dropped bits) / 2^16.
    """
    values = values.float()
    rounded = ((values.view(torch.int32) + rounding_noise(values, key)) & -65536).view(torch.float32)
    # A NaN's bit pattern can wrap around to a number when the noise is added: keep it a NaN.
    return torch.where(values.isnan(), values, rounded).to(torch.bfloat16)


def store(target: torch.Tensor, values: torch.Tensor, key: torch.Tensor) -> None:
    """Write fp32 `values` into `target`, stochastically rounded if the target is bf16."""
    if target.dtype == torch.bfloat16:
        target.copy_(round_to_bf16_stochastically(values, key))
    else:
        target.copy_(values)


def adamw_update(weight, grad, exp_avg, exp_avg_sq, hyper, grad_scale, master=None, zero_grad=False):
    """One AdamW update of one flattened tensor, computed in fp32.

    hyper: the tensor's row of numbers for this step (LR .. KEY above), on the weight's device, so
    a compiled version serves every step without recompiling and a recorded graph reads new numbers.
    grad_scale: a device scalar every gradient is multiplied by first (the clipping factor).
    The weight and each moment round with their own key. With `master`, the weight's fp32 copy, the
    update starts from and is written to the master, and the weight gets it rounded to nearest.
    With `zero_grad` the gradient is zeroed in the same pass, for the next step to add into.
    """
    lr, beta1, beta2, eps, weight_decay, correction1, correction2, key = hyper.unbind()
    gradient = grad.float() * grad_scale
    exp_avg_new = exp_avg.float() * beta1 + gradient * (1 - beta1)
    exp_avg_sq_new = exp_avg_sq.float() * beta2 + gradient * gradient * (1 - beta2)
    denominator = (exp_avg_sq_new / correction2).sqrt() + eps
    start = weight if master is None else master
    weight_new = start.float() * (1 - lr * weight_decay) - (lr / correction1) * exp_avg_new / denominator
    if master is None:
        store(weight, weight_new, key)
    else:
        master.copy_(weight_new)
        weight.copy_(weight_new)
    store(exp_avg, exp_avg_new, key + 1)
    store(exp_avg_sq, exp_avg_sq_new, key + 2)
    if zero_grad:
        grad.zero_()


class Bf16WeightsAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) for weights of any dtype.
    With `fp32_master`, fp32 master weights and moments in the optimizer's state; without it,
    moments in the weight's dtype and bf16 results rounded stochastically.

    The rounding noise of a tensor in a step depends only on (seed, parameter group, tensor, step),
    not on whatever else drew random numbers before: every data-parallel process draws the same
    noise, so their weights stay identical, and a resumed run draws what the uninterrupted run drew.

    With `compile` (on CUDA) the per-tensor update is compiled into one fused kernel (all tensors
    are flattened, so one dynamic-shape graph serves them all). With `record_graph` too, once two
    steps in a row update the same tensors (the gradients are kept between steps, as CUDA-graph
    training keeps them), the step, a kernel per tensor, is recorded as one CUDA graph and replayed
    from then on: the host then only writes each step's numbers (learning rate, bias corrections,
    rounding keys) instead of launching hundreds of kernels.

    Clipping and zeroing ride in the update's pass over the gradients (a training step is bound by
    memory traffic, and these would be two more passes): `clip_grad_norm_` only measures the norm
    and sets the factor the next step scales by, and with `zero_grads` each step leaves the
    gradients it used zeroed, where a trainer that keeps its gradient tensors would zero them.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, seed=0, compile=False,
                 record_graph=False, fp32_master=False, zero_grads=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.fp32_master = fp32_master
        self.zero_grads = zero_grads
        self.grad_scale = None  # a device scalar, the next step's clipping factor (1 when not clipping)
        self.update = torch.compile(adamw_update, dynamic=True) if compile else adamw_update
        self.record_graph = record_graph and compile  # an uncompiled update would fill the graph's pool
        self.numbers_on_device = {}  # group index -> its [params, 8] rows, which every update reads
        self.last_tensors = None     # the tensors the previous step updated, to know when to record
        self.graph = None            # the recorded step, and the tensors it updates
        self.graph_tensors = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = []  # (group index, parameter index, weight)
        for group_index, group in enumerate(self.param_groups):
            stepped = [(index, weight) for index, weight in enumerate(group["params"]) if weight.grad is not None]
            if stepped:
                self.write_numbers(group_index, group, stepped)
                updates += [(group_index, index, weight) for index, weight in stepped]
        if not updates:
            return loss
        tensors = tuple(tensor for _, _, weight in updates for tensor in self.tensors_of(weight))
        if self.graph is not None and same_tensors(tensors, self.graph_tensors):
            self.graph.replay()
            self.grad_scale.fill_(1.0)
            return loss
        self.graph = None
        self.apply(updates)
        if self.record_graph and tensors and tensors[0].is_cuda and same_tensors(tensors, self.last_tensors):
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.apply(updates)  # recording only records: this step's update ran just above
            except RuntimeError as error:
                raise RuntimeError(f"recording the --low_memory optimizer step as a CUDA graph failed, which leaves "
                                   f"CUDA unusable in this process. Resume from the last checkpoint with "
                                   f"--cuda_graphs no. The error was: {error}") from error
            self.graph, self.graph_tensors = graph, tensors
        self.last_tensors = tensors
        self.grad_scale.fill_(1.0)  # the factor was this step's
        return loss

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over this optimizer's weights, with the scaling left to the
        next step's update: returns the gradients' total norm, and sets the factor
        min(1, max_norm / (norm + 1e-6)) by which the update multiplies them."""
        grads = [weight.grad for group in self.param_groups for weight in group["params"] if weight.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.scale_of(norm.device).copy_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def scale_of(self, device) -> torch.Tensor:
        if self.grad_scale is None:
            self.grad_scale = torch.ones((), device=device)
        return self.grad_scale

    def tensors_of(self, weight) -> tuple:
        """The tensors one update reads and writes: weight, gradient, moments (and master)."""
        state = self.state[weight]
        master = (state["master"],) if self.fp32_master else ()
        return (weight, weight.grad, state["exp_avg"], state["exp_avg_sq"]) + master

    def apply(self, updates: list):
        for group_index, index, weight in updates:
            numbers = self.numbers_on_device[group_index][index]
            # Flat, and detached: a tensor of its own over the same memory rather than a view, since the
            # compiled update would guard on a view's base, whose number of dimensions differs between
            # matrices and vectors, and compile a second time.
            weight, grad, exp_avg, exp_avg_sq, *master = (tensor.view(-1).detach() for tensor in self.tensors_of(weight))
            self.update(weight, grad, exp_avg, exp_avg_sq, numbers, self.scale_of(weight.device), *master,
                        zero_grad=self.zero_grads)

    def write_numbers(self, group_index: int, group: dict, stepped: list):
        """Advance the stepped tensors' step counts and write the group's rows for this step, with
        one host-to-device copy, into the buffer the updates (and a recorded graph) read."""
        beta1, beta2 = group["betas"]
        rows = [[0.0] * 8 for _ in group["params"]]
        for index, weight in stepped:
            state = self.state[weight]
            if not state:
                state["step"] = 0
                state_dtype = torch.float32 if self.fp32_master else weight.dtype
                state["exp_avg"] = torch.zeros_like(weight, dtype=state_dtype)
                state["exp_avg_sq"] = torch.zeros_like(weight, dtype=state_dtype)
                if self.fp32_master:
                    state["master"] = weight.detach().float().clone()
            state["step"] += 1
            step = state["step"]
            # The weight, exp_avg and exp_avg_sq round with key, key + 1 and key + 2.
            key = hash((self.seed, group_index, index, step)) % (KEY_LIMIT - 2)
            rows[index] = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"], 1 - beta1 ** step,
                           1 - beta2 ** step, float(key)]
        values = torch.tensor(rows, dtype=torch.float32)
        device = stepped[0][1].device
        if group_index not in self.numbers_on_device:
            self.numbers_on_device[group_index] = torch.empty_like(values, device=device)
        self.numbers_on_device[group_index].copy_(values)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.fp32_master:
            # torch casts every loaded state tensor to its weight's dtype, bf16 here, which would round
            # the fp32 master weights and moments: put the saved fp32 tensors back.
            saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
            weights = dict(zip(saved_ids, (weight for group in self.param_groups for weight in group["params"])))
            for index, saved in state_dict["state"].items():
                weight = weights[index]
                for name in ("master", "exp_avg", "exp_avg_sq"):
                    self.state[weight][name] = saved[name].to(weight.device, torch.float32, copy=True)
        self.graph = self.last_tensors = None  # new moment tensors: record again


def same_tensors(tensors: tuple, others) -> bool:
    return others is not None and len(tensors) == len(others) and all(a is b for a, b in zip(tensors, others))
