"""AdamW that keeps weights and moments in bf16: the optimizer of `--low_memory`.

Default training keeps fp32 weights and two fp32 AdamW moments: 12 bytes per trained weight,
plus 4 for its gradient; 1.7B then needs ~27 GB before any activation. Here weights, gradients and
moments are all bf16 (8 bytes per trained weight, ~13 GB for 1.7B).

Plain bf16 would lose the updates: bf16 keeps 8 significant bits, so a weight of 0.02 moves in
steps of ~1e-4 and an update of lr 5e-5 times a unit-sized Adam step rounds back to the old value.
The new weight (and moment) is therefore computed in fp32 and rounded *stochastically* to bf16:
up with probability equal to the fraction dropped, so each rounding is exact on average and
small updates add up over steps as they would in fp32.
"""

import torch


def round_to_bf16_stochastically(values: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, unbiased: E[result] = values.

    bf16 is the top 16 bits of fp32. Adding a uniform random number below 2^16 to the bit pattern
    and dropping the low 16 bits rounds the magnitude up exactly when the noise exceeds the
    dropped bits' complement, i.e. with probability (dropped bits) / 2^16.
    """
    values = values.float()
    noise = torch.randint_like(values, 0, 1 << 16, dtype=torch.int32)
    rounded = ((values.view(torch.int32) + noise) & -65536).view(torch.float32)
    # A NaN's bit pattern can wrap around to a number when the noise is added: keep it a NaN.
    return torch.where(values.isnan(), values, rounded).to(torch.bfloat16)


def store(target: torch.Tensor, values: torch.Tensor) -> None:
    """Write fp32 `values` into `target`, stochastically rounded if the target is bf16."""
    if target.dtype == torch.bfloat16:
        target.copy_(round_to_bf16_stochastically(values))
    else:
        target.copy_(values)


def adamw_update(weight, grad, exp_avg, exp_avg_sq, hyper):
    """One AdamW update of one flattened tensor, computed in fp32.

    hyper = [lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2], a tensor on
    the weight's device, so a compiled version serves every step without recompiling.
    """
    lr, beta1, beta2, eps, weight_decay, correction1, correction2 = hyper.unbind()
    grad = grad.float()
    exp_avg_new = exp_avg.float() * beta1 + grad * (1 - beta1)
    exp_avg_sq_new = exp_avg_sq.float() * beta2 + grad * grad * (1 - beta2)
    denominator = (exp_avg_sq_new / correction2).sqrt() + eps
    weight_new = weight.float() * (1 - lr * weight_decay) - (lr / correction1) * exp_avg_new / denominator
    store(weight, weight_new)
    store(exp_avg, exp_avg_new)
    store(exp_avg_sq, exp_avg_sq_new)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) for weights of any dtype;
    moments are kept in the weight's dtype, and bf16 results are rounded stochastically.

    The rounding noise of a step depends only on (seed, parameter group, step), not on whatever
    else drew random numbers before: every data-parallel process draws the same noise, so their
    weights stay identical, and a resumed run draws what the uninterrupted run drew.

    On CUDA the per-tensor update is compiled into one fused kernel (all tensors are flattened, so
    one dynamic-shape graph serves them all).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, seed=0, compile=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.update = torch.compile(adamw_update, dynamic=True) if compile else adamw_update

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            weights = [weight for weight in group["params"] if weight.grad is not None]
            if not weights:
                continue
            for weight in weights:
                state = self.state[weight]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(weight)
                    state["exp_avg_sq"] = torch.zeros_like(weight)
                state["step"] += 1
            beta1, beta2 = group["betas"]
            hyper_by_key = {}
            # Seed the rounding from (seed, group, step), in a forked stream that leaves the global one as it was.
            devices = sorted({weight.device for weight in weights}, key=str)
            gpus = [device for device in devices if device.type == "cuda"]
            seed = hash((self.seed, group_index, self.state[weights[0]]["step"])) % 2**63
            with torch.random.fork_rng(devices=gpus):
                torch.random.default_generator.manual_seed(seed)
                for device in gpus:
                    torch.cuda.default_generators[device.index].manual_seed(seed)
                for weight in weights:
                    state = self.state[weight]
                    step = state["step"]
                    key = (weight.device, step)
                    if key not in hyper_by_key:  # one small host-to-device copy per group and step
                        hyper_by_key[key] = torch.tensor(
                            [group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                             1 - beta1 ** step, 1 - beta2 ** step], dtype=torch.float32).to(weight.device)
                    self.update(weight.view(-1), weight.grad.view(-1), state["exp_avg"].view(-1),
                                state["exp_avg_sq"].view(-1), hyper_by_key[key])
        return loss
