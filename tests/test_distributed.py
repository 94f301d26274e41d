"""
Distributed: 2 ranks on CPU with gloo, launched with torchrun from the tests (conftest.launch_ranks). A
launch costs ~8 s, so each launch runs several checks and writes results for the test to compare with a single
process. The ranks run this file: its __main__ (at the end) dispatches to dist_worker, bert_dist_worker or
t5_dist_worker. tests/test_faults.py launches it too (phase 'die': a dead rank).
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data
import model as M
import parallelize
import train

from conftest import BERT_CFG, T5_CFG, from_hf, hf_libs, logit_gap, perturb, run_ranks, t5_cfg, tiny_cfg, torchrun

pytestmark = pytest.mark.distributed  # every test here launches 2 ranks


DIST = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64, batch_size=4, gradient_accumulation_steps=2,
            max_iters=6, eval_interval=3, eval_iters=2, warmup_iters=2, lr_decay_iters=8, threads=1)


def full_state(model):
    """The whole (unsharded) state dict on every rank, as plain CPU tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


DIST_MODES = (("ddp", dict(parallel="ddp")), ("fsdp", dict(parallel="fsdp")),
              ("fsdp_bf16_ac", dict(parallel="fsdp", dtype="bfloat16", activation_checkpointing="full")))


def modes_worker(make_cfg, record, out, file):
    """On each rank: a run per DIST_MODES entry (make_cfg(its out_dir, **its keys)), and rank 0 saves
    {mode: record(summary)} to out/file for the test to compare with a single process."""
    res = {name: record(train.train(make_cfg(Path(out) / name, **kw))) for name, kw in DIST_MODES}
    if int(os.environ["RANK"]) == 0:
        torch.save(res, Path(out) / file)


def assert_close_states(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# decoder-only: DDP, FSDP (bf16, activation checkpointing, per-step sync), Muon, sharded init, resume

def dist_worker(phase, data_root, out):
    """Runs under torchrun (2 ranks); results go to out/ as .pt files written by rank 0."""
    out = Path(out)
    rank = int(os.environ["RANK"])
    res = {}

    def run(name, **kw):
        cfg = tiny_cfg(data_root, out / name, **{**DIST, **kw})
        s = train.train(cfg)
        res[name] = {"losses": s["train_losses"], "evals": s["evals"], "state": full_state(s["model"])}

    if phase == "1":
        reads, saves, real, prune = [], [], common.to_host, train.prune_checkpoints  # the host reads of a DDP run
        common.to_host = train.to_host = lambda t: reads.append(1) or real(t)
        train.prune_checkpoints = lambda *a: saves.append(1) or prune(*a)  # once per save, on rank 0
        run("ddp", parallel="ddp")
        common.to_host, train.to_host, train.prune_checkpoints = real, real, prune
        res["ddp_reads"], res["ddp_saves"] = len(reads), len(saves)
        run("fsdp", parallel="fsdp")
        seen, rope = set(), M.apply_rope  # what RoPE's tables look like inside an FSDP block in bf16
        M.apply_rope = lambda x, cos, sin: seen.add((x.dtype, cos.dtype)) or rope(x, cos, sin)
        run("fsdp_bf16", parallel="fsdp", dtype="bfloat16")
        M.apply_rope, res["rope_dtypes"] = rope, sorted(map(str, seen))
        run("fsdp_step_sync", parallel="fsdp", fsdp_grad_sync="step")  # reduce-scatter once per step
        run("fsdp_ac", parallel="fsdp", activation_checkpointing="full")
        run("fsdp_ckpt", parallel="fsdp", max_iters=3)  # leaves out/fsdp_ckpt/ckpt.dcp at step 3
        run("ddp_muon", parallel="ddp", optimizer="muon", lr_schedule="wsd")
        # meta-device init, sharded, equals a single-process init with the same seed
        cfg = tiny_cfg(data_root, out, **DIST)
        mcfg = M.config_from_preset("tiny", **{k: DIST[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head",
                                                                    "block_size")})
        m = train.build_model(cfg, mcfg, parallelize.Runtime(torch.device("cpu"), torch.float32, rank, 2, "fsdp"))
        res["init"] = full_state(m)
        res["init_local"] = {n: tuple(p.to_local().shape) for n, p in m.named_parameters()}
        # LLaMA-7B: sharded on the meta device; nothing is materialised
        import resource
        with torch.device("meta"):
            big = M.from_config(M.config_from_preset("llama-7b"))
        from torch.distributed.fsdp import fully_shard
        for block in big.blocks:
            fully_shard(block)
        fully_shard(big)
        res["7b"] = {"params": {n: (tuple(p.shape), tuple(p.to_local().shape), p.to_local().is_meta)
                                for n, p in big.named_parameters()},
                     "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    elif phase == "hf":  # init_from='hf:DIR' under FSDP: each rank reads only its own chunks
        import hf
        load, rows = hf.load_checkpoint, {}
        hf.load_checkpoint = lambda *a: (lambda ck: rows.update({k: v.shape[0] for k, v in ck["model"].items()})
                                         or ck)(load(*a))
        run("hf", parallel="fsdp", init_from=f"hf:{out / 'hf_llama'}", max_iters=0, n_layer=None, n_embd=None,
            n_head=None, n_kv_head=None, block_size=None)
        res["rows"] = rows
        run("hf_ckpt", parallel="fsdp", init_from=f"hf:{out / 'hf_llama'}", max_iters=1, warmup_iters=0, n_layer=None,
            n_embd=None, n_head=None, n_kv_head=None, block_size=None)  # leaves a sharded best.dcp to export
    elif phase == "die":  # rank 1 dies at its 3rd batch; rank 0 must not hang in the next collective
        if rank == 1:
            calls, real = [0], data.windows
            def dying(*a):
                calls[0] += 1
                if calls[0] == 3:
                    os._exit(17)
                return real(*a)
            data.windows = dying
        run("die", parallel="ddp", dist_timeout_minutes=1, max_iters=50)
    else:  # a fresh launch resumes what phase 1 and the single-process test left behind
        run("fsdp_ckpt", parallel="fsdp", init_from="resume")
        run("single_to_fsdp", parallel="fsdp", init_from="resume")
    if rank == 0:
        torch.save(res, out / f"phase{phase}.pt")


@pytest.mark.slow
def test_distributed_matches_single_process(data_root, tmp_path):
    one = train.train(tiny_cfg(data_root, tmp_path / "single", **{**DIST, "batch_size": 8}))  # same global batch
    single = {"losses": one["train_losses"], "state": {k: v.clone() for k, v in one["model"].state_dict().items()}}
    # the single process also checkpoints at step 3, for phase 2 to resume under FSDP (.pt -> sharded)
    train.train(tiny_cfg(data_root, tmp_path / "single_to_fsdp", **{**DIST, "max_iters": 3, "batch_size": 8}))
    p1 = torchrun("1", data_root, tmp_path)

    for name in ("ddp", "fsdp", "fsdp_ac", "fsdp_step_sync"):
        np.testing.assert_allclose(p1[name]["losses"], single["losses"], atol=1e-5, rtol=0, err_msg=name)
        assert_close_states(p1[name]["state"], single["state"], atol=1e-4)
    # the validation set is the same rows at any world size: eval_iters x batch_size (4 here), so at step 0 (the
    # same initial weights) a single process of batch 4 and 2 ranks of batch 4 read the same loss
    four = train.train(tiny_cfg(data_root, tmp_path / "single4", **{**DIST, "max_iters": 1, "eval_interval": 1}))
    assert p1["ddp"]["evals"][0] == (0, pytest.approx(four["evals"][0][1], abs=1e-6))
    # a DDP step reads the host once, an evaluation and a checkpoint once each (rank 0's count; the same on each)
    assert (p1["ddp_reads"], p1["ddp_saves"]) == (6 + 3 + p1["ddp_saves"], 2)
    np.testing.assert_allclose(p1["fsdp_bf16"]["losses"], single["losses"], atol=5e-3, rtol=0)
    muon = train.train(tiny_cfg(data_root, tmp_path / "single_muon", **{**DIST, "batch_size": 8}, optimizer="muon",
                                lr_schedule="wsd"))
    # Muon's Newton-Schulz runs in bf16: the all-reduce's last-bit differences flip some bf16 roundings, measured
    # measured as 3e-5 in the loss; the iteration (slope ~3.4 at 0, 5 steps) amplifies them in a matrix's small
    # singular directions, so weights differ by up to ~2% of a small matrix's norm after 6 steps: the losses are
    # compared
    np.testing.assert_allclose(p1["ddp_muon"]["losses"], muon["train_losses"], atol=1e-4, rtol=0)
    assert not np.allclose(muon["train_losses"], single["losses"])  # (Muon did step differently from AdamW)
    # bf16 activations, RoPE tables kept fp32  # bf16 compute, fp32 master weights and reduction: measured within 2.3e-3
    assert p1["rope_dtypes"] == ["(torch.bfloat16, torch.float32)"]

    # initialisation: sharded on meta, materialised, equal to single-process init; each rank holds half
    init = M.from_config(M.config_from_preset("tiny", **{k: DIST[k] for k in ("n_layer", "n_embd", "n_head",
                                                                              "n_kv_head", "block_size")}))
    init.init_weights(DIST.get("seed", train.DEFAULTS["seed"]))
    assert_close_states(p1["init"], init.state_dict(), atol=0)
    assert p1["init_local"]["blocks.0.attn.kv.weight"] == (32, 64)  # 64 rows of K and V, split across 2 ranks

    # llama-7b: every parameter sharded in half along dim 0, nothing allocated
    params = p1["7b"]["params"]
    assert len(params) == 32 * 7 + 3
    for name, (full, local, is_meta) in params.items():
        assert local[0] == (full[0] + 1) // 2 and local[1:] == full[1:] and is_meta, name
    assert p1["7b"]["maxrss_mb"] < 4000  # the full model would be 27,000 MB in fp32

    # resume: FSDP at step 3 -> a fresh 2-rank launch, and -> a single process; single .pt -> FSDP
    import shutil
    shutil.copytree(tmp_path / "fsdp_ckpt", tmp_path / "fsdp_ckpt_ws1")  # phase 2 moves the original on
    p2 = torchrun("2", data_root, tmp_path)
    fsdp_resumed = p1["fsdp_ckpt"]["losses"] + p2["fsdp_ckpt"]["losses"]
    assert fsdp_resumed == p1["fsdp"]["losses"]  # exact, bit for bit
    assert_close_states(p2["fsdp_ckpt"]["state"], p1["fsdp"]["state"], atol=0)
    np.testing.assert_allclose(p2["single_to_fsdp"]["losses"], single["losses"][3:], atol=1e-5, rtol=0)
    ws1 = train.train(tiny_cfg(data_root, tmp_path / "fsdp_ckpt_ws1", **{**DIST, "batch_size": 8,
                                                                         "init_from": "resume"}))
    np.testing.assert_allclose(ws1["train_losses"], single["losses"][3:], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_hf_import_under_fsdp_reads_only_local_shards(data_root, tmp_path):
    t = hf_libs()
    torch.manual_seed(0)
    ref = perturb(t.LlamaForCausalLM(t.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=64)))
    ref.save_pretrained(tmp_path / "hf_llama")
    single, _ = from_hf(tmp_path / "hf_llama")
    p = torchrun("hf", data_root, tmp_path)
    assert_close_states(p["hf"]["state"], single.state_dict(), atol=0)  # the same weights as a single process
    assert p["rows"]["tok_emb.weight"] == 150 and p["rows"]["blocks.0.attn.kv.weight"] == 16  # half of 300, of 32
    import sample  # a sharded FSDP checkpoint exports straight to a Hugging Face folder
    assert sample.main([f"--ckpt={tmp_path / 'hf_ckpt' / 'best.dcp'}", f"--export_hf={tmp_path / 'out_hf'}"]) == 0
    back, info = t.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out_hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    net, _ = sample.load_model(str(tmp_path / "hf_ckpt" / "best.dcp"))
    assert logit_gap(net, back.eval(), torch.randint(0, 300, (2, 24))) < 1e-5


# ------------------------------------------------------------------------------------------------
# encoder: DDP, FSDP (with bf16 and activation checkpointing) on the MLM+NSP objective

BERT_DIST = dict(BERT_CFG, batch_size=4, gradient_accumulation_steps=2, max_iters=4, eval_interval=2, eval_iters=2,
                 warmup_iters=2, lr_decay_iters=6, threads=1)


def bert_dist_worker(data_root, out):  # eval_iters x 2: the single process's 2 x 8 validation rows, in 4 x 4
    modes_worker(lambda o, **kw: tiny_cfg(data_root, o, **{**BERT_DIST, "eval_iters": 4}, **kw),
                 lambda s: {"losses": s["train_losses"], "metrics": s["metrics"]}, out, "bert_dist.pt")


@pytest.mark.slow
def test_mlm_nsp_distributed_matches_single_process(data_root, tmp_path):
    one = train.train(tiny_cfg(data_root, tmp_path / "single", **{**BERT_DIST, "batch_size": 8}))  # same global batch
    run_ranks("dist_bert", data_root, tmp_path)
    res = torch.load(tmp_path / "bert_dist.pt", weights_only=True)
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(res[name]["losses"], one["train_losses"], atol=1e-5, rtol=0, err_msg=name)
        for k, v in one["metrics"].items():  # the same validation pairs, split across the ranks
            assert res[name]["metrics"][k] == pytest.approx(v, abs=1e-5), (name, k)
    np.testing.assert_allclose(res["fsdp_bf16_ac"]["losses"], one["train_losses"], atol=3e-2, rtol=0)


# ------------------------------------------------------------------------------------------------
# encoder-decoder: DDP and FSDP (every encoder and decoder block sharded)

T5_DIST = dict(batch_size=2, gradient_accumulation_steps=2, max_iters=4, eval_interval=2, eval_iters=2, warmup_iters=2,
               lr_decay_iters=6, threads=1)


def t5_dist_worker(data_root, out):  # eval_iters x 2: the single process's validation rows
    modes_worker(lambda o, **kw: t5_cfg(data_root, o, **{**T5_DIST, "eval_iters": 4}, **kw),
                 lambda s: {"losses": s["train_losses"], "evals": s["evals"],
                            "sharded": sum(type(b).__name__.startswith("FSDP")
                                           for b in [*s["model"].blocks, *s["model"].dec_blocks])},
                 out, "t5_dist.pt")


@pytest.mark.slow
def test_t5_distributed_matches_single_process(data_root, tmp_path):
    one = train.train(t5_cfg(data_root, tmp_path / "single", **{**T5_DIST, "batch_size": 4}))  # same global batch
    run_ranks("dist_t5", data_root, tmp_path)
    res = torch.load(tmp_path / "t5_dist.pt", weights_only=True)
    assert (res["fsdp"]["sharded"] == T5_CFG["n_layer"] + M.PRESETS["t5-tiny"]["n_dec_layer"]
            and res["ddp"]["sharded"] == 0)
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(res[name]["losses"], one["train_losses"], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose([v for _, v in res[name]["evals"]], [v for _, v in one["evals"]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(res["fsdp_bf16_ac"]["losses"], one["train_losses"], atol=5e-2, rtol=0)


if __name__ == "__main__":  # on each rank under torchrun (conftest.launch_ranks): the worker argv[1] names
    worker = {"dist": dist_worker, "dist_bert": bert_dist_worker, "dist_t5": t5_dist_worker}[sys.argv[1]]
    worker(*sys.argv[2:])
    torch.distributed.barrier()  # both ranks done (rank 0 has saved the results): they leave the group together
    torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # and skip the interpreter's teardown of torch's C++ state, where gloo rarely aborts ("terminate
    #              called without an active exception", SIGABRT: 1 launch in CI) after all the work is done
