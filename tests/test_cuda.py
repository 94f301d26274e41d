"""
CUDA: these run where a GPU is (.ci/gpu runs them on one, with -m cuda) and skip elsewhere, with their reason.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import common
import train

from conftest import REPO, tiny_cfg
from test_model import small_model

pytestmark = pytest.mark.cuda


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run .ci/gpu on a GPU machine")


GPU = dict(device="cuda", threads=0, compile=False, n_layer=4, n_embd=128, block_size=128, batch_size=16)


@needs_cuda
def test_cuda_bf16_compiled_50_steps_learn(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path, **{**GPU, "compile": True}, dtype="bfloat16", max_iters=50,
                             eval_interval=25))
    assert all(np.isfinite(s["train_losses"])) and s["bad_steps"] == 0
    (_, v0), _, (_, v50) = s["evals"]
    assert v50 < v0 - 2.0, s["evals"]  # from ln(257) = 5.55 to below a unigram byte model
    assert checkpoint.load_checkpoint(tmp_path / "best.pt")["provenance"]["device_name"] == torch.cuda.get_device_name()


@needs_cuda
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_cuda_fp16_with_grad_scaler(data_root, tmp_path, optimizer, monkeypatch):
    """fp16 with the loss scaler, AdamW and Muon: it learns, and a step reads the host once (the scaler's skip
    of an overflowing step is decided on the device: no .item() for an optimizer without amp support)."""
    reads, real = [], common.to_host
    monkeypatch.setattr(common, "to_host", lambda t: reads.append(1) or real(t))  # the step's read, to_host_later
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a .item() read") if t.is_cuda else item(t))
    s = train.train(tiny_cfg(data_root, tmp_path, **GPU, dtype="float16", max_iters=40, eval_interval=20,
                             optimizer=optimizer, lr_schedule="wsd" if optimizer == "muon" else "cosine"))
    assert len(reads) == 40  # one per step (evaluations and saves read through train.to_host)
    assert s["evals"][-1][1] < s["evals"][0][1] - 1.5, s["evals"]
    scaler = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path))["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # the scaler ran and its state was saved


@pytest.mark.distributed
@needs_cuda
def test_cuda_fsdp_world_size_1_with_activation_checkpointing(data_root, tmp_path):
    kw = dict(GPU, dtype="float32", max_iters=8, eval_interval=4, log_interval=1)
    single = train.train(tiny_cfg(data_root, tmp_path / "single", **kw))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(REPO / "train.py")]
                       + [f"--{k}={v}" for k, v in tiny_cfg(data_root, tmp_path / "fsdp", **kw, parallel="fsdp",
                                                              activation_checkpointing="full").items()
                          if v is not None],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "fsdp" / "log.jsonl")]
    losses = [rec["loss"] for rec in log if "loss" in rec]
    np.testing.assert_allclose(losses, np.round(single["train_losses"], 4), atol=2e-3)  # TF32 in both
    assert (tmp_path / "fsdp" / "ckpt-0000008.dcp").is_dir()


@needs_cuda
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_cuda_kv_cache_equals_recompute(style):
    m = small_model(style).cuda()
    prompt = torch.randint(0, 97, (2, 5), device="cuda")
    assert torch.equal(m.generate(prompt, 25, temperature=0, use_cache=True),
                       m.generate(prompt, 25, temperature=0, use_cache=False))


@needs_cuda
def test_cuda_resume_within_a_run(data_root, tmp_path):
    kw = dict(GPU, dtype="bfloat16", max_iters=12, eval_interval=6, lr_decay_iters=12)
    full = train.train(tiny_cfg(data_root, tmp_path / "a", **kw))
    half = train.train(tiny_cfg(data_root, tmp_path / "b", **{**kw, "max_iters": 6}))
    rest = train.train(tiny_cfg(data_root, tmp_path / "b", **kw, init_from="resume"))
    assert len(half["train_losses"] + rest["train_losses"]) == 12 and rest["step"] == 12
    # GPU kernels need not be bit-reproducible (atomics in attention's backward): close, not equal
    np.testing.assert_allclose(half["train_losses"] + rest["train_losses"], full["train_losses"], atol=2e-2)
