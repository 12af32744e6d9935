"""Shared test tools: running the scripts as a user would, an optimizer's steps on one weight, and generation
forced along known codes."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, rows) -> Path:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


# What the tests train with unless they say otherwise: small, quick, deterministic steps; no speaking at
# evaluations (the tiny model's speech never stops, so it runs to the frame cap: test_scored_checkpoints);
# eager layers and no CUDA graphs, which is what `auto` means on a CPU. On a GPU, `auto` compiles the
# layers in every run (30-60 s each): the whole suite took over 25 minutes that way. The tests that own
# the GPU path pass GPU_DEFAULT_PATH (test_cuda_graphs, the non-finite guard, the SIGKILL resume; the
# demo and the bench run the defaults anyway), and test_compiled_forward and test_cuda_graphs prove
# that path computes what eager does.
TEST_FLAGS = dict(batch_size=2, gradient_accumulation_steps=1, num_epochs=1, warmup_steps=0, lr=1e-3,
                  logging_steps=1, num_workers=0, report_to="none", eval_generate_steps=0,
                  torch_compile="no", cuda_graphs="no")
GPU_DEFAULT_PATH = dict(torch_compile="auto", cuda_graphs="auto")  # what a user's run on a GPU does


def trainer_argv(model_dir, train_jsonl, output_dir, **flags) -> list:
    """The trainer's command line: TEST_FLAGS, overridden by `flags` (True: a bare switch; False or
    None: left out)."""
    settings = dict(init_model_path=model_dir, train_jsonl=train_jsonl, output_model_path=output_dir, **TEST_FLAGS)
    settings.update(flags)
    argv = []
    for name, value in settings.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not False and value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def train(model_dir, train_jsonl, output_dir, **flags):
    """Run sft_12hz_chatterbox.main in this process, as a user would run the command."""
    import sft_12hz_chatterbox

    sft_12hz_chatterbox.main(trainer_argv(model_dir, train_jsonl, output_dir, **flags))
    return Path(output_dir)


def build_run(model_dir, train_jsonl, output_dir, **flags):
    """The trainer's own setup (training_setup.build_run), in this process: a run ready to train."""
    import sft_12hz_chatterbox
    from qwen3_tts_sft.training_setup import build_run as build

    argv = trainer_argv(model_dir, train_jsonl, output_dir, **flags)
    return build(sft_12hz_chatterbox.check_args(sft_12hz_chatterbox.parse_args(argv)))


def adamw_steps(optimizer_class, weight, gradients, **options) -> tuple:
    """(the parameter, its optimizer) after one step per gradient, from a copy of `weight`: lr 1e-3,
    weight decay 0.1, each gradient given in the weight's dtype."""
    weight = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_class([weight], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, **options)
    for gradient in gradients:
        weight.grad = gradient.to(weight.dtype)
        optimizer.step()
    return weight, optimizer


def run_script(*args, timeout=600, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run a project script in a child Python, as a user would."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


class ForcedHead(nn.Module):
    """Wraps an output head: records the real logits of the newest position, then returns logits
    that make greedy decoding pick `next_target()`, so generation follows known codes."""

    def __init__(self, head, log, next_target):
        super().__init__()
        self.head, self.log, self.next_target = head, log, next_target

    def forward(self, hidden):
        logits = self.head(hidden)
        self.log.append(logits[:, -1].detach().clone())
        forced = torch.zeros_like(logits)
        forced[..., self.next_target()] = 1e4  # beats any repetition penalty or logits processor
        return forced


@contextlib.contextmanager
def forced_heads(model, codes: np.ndarray, eos_id: int):
    """Make model.generate follow `codes` [frames, groups] and then codec_eos; yields the logit logs."""
    talker, predictor = model.talker, model.talker.code_predictor
    codec0_log, sub_log, frame = [], [], [-1]
    codec0_targets = list(codes[:, 0]) + [eos_id]

    def sub_target(head_index):
        if head_index == 0:
            frame[0] += 1
        return int(codes[frame[0], head_index + 1])

    original_codec_head, original_heads = talker.codec_head, list(predictor.lm_head)
    talker.codec_head = ForcedHead(original_codec_head, codec0_log, lambda: int(codec0_targets[len(codec0_log) - 1]))
    for index in range(len(original_heads)):
        predictor.lm_head[index] = ForcedHead(original_heads[index], sub_log, lambda i=index: sub_target(i))
    try:
        yield codec0_log, sub_log
    finally:
        talker.codec_head = original_codec_head
        for index, head in enumerate(original_heads):
            predictor.lm_head[index] = head


def forced_generation_logits(model, prompt: list, language: str, speaker: str, codes: np.ndarray,
                             non_streaming_mode: bool = True):
    """Stock Qwen3TTSForConditionalGeneration.generate, forced along `codes`.

    Returns (group-0 logits [frames+1, vocab], code-predictor logits [frames, groups-1, codebook]).
    """
    eos = model.config.talker_config.codec_eos_token_id
    with forced_heads(model, codes, eos) as (codec0_log, sub_log):
        generated, _ = model.generate(
            input_ids=[torch.tensor([prompt])], languages=[language], speakers=[speaker],
            non_streaming_mode=non_streaming_mode, do_sample=False, subtalker_dosample=False,
            max_new_tokens=len(codes) + 4,
        )
    assert np.array_equal(generated[0].numpy(), codes), "generation did not follow the forced codes"
    frames, groups = codes.shape
    return torch.cat(codec0_log), torch.cat(sub_log).view(frames, groups - 1, -1)
