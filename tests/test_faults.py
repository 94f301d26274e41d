"""
Faults: kills (SIGKILL anywhere, then an exact resume), preemption (SIGTERM), NaNs, a full disk, a dead rank,
bad checkpoints, bad inputs and values rejected before any work, one-line CLI errors, the run folder's lock.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import prepare
import checkpoint
import common
import data
import model as M
import train

from conftest import REPO, launch_ranks, main_fails, tiny_cfg


FAULT = dict(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=8, warmup_iters=5, eval_iters=2,
             dropout=0.1, threads=1, log_interval=1, optimizer="adamw", lr_schedule="cosine", min_lr=3e-4)


def cli(cfg, data_root, out_dir):
    return [sys.executable, str(REPO / "train.py")] + [f"--{k}={v}" for k, v in
                                                       dict(FAULT, data_root=data_root, out_dir=out_dir, **cfg).items()]


# ------------------------------------------------------------------------------------------------
# kills, preemption, NaNs, a full disk, a dead rank

@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_exact(data_root, tmp_path):
    """kill -9 at random moments (each after a random number of step lines, then a random pause inside the next
    steps, which write a checkpoint each), resume, repeat: the final weights equal an uninterrupted run's, bit for
    bit. Kills come after a count of steps, not a time, so the run cannot finish before the kills are spent; if one
    ever does, resuming a finished run is a success too (one line, exit 0): nothing here depends on timing."""
    import random
    import signal
    import time
    cfg = dict(max_iters=200, eval_interval=20, checkpoint_interval=1, keep_last=2, device="cpu")
    ref = train.train(tiny_cfg(data_root, tmp_path / "ref", **cfg, **FAULT))
    out, kills, rng = tmp_path / "killed", 0, random.Random(0)
    while kills < 10:
        init = "resume" if checkpoint.find_checkpoint(out) else "scratch"
        p = subprocess.Popen(cli(dict(cfg, init_from=init), data_root, out), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait = rng.randint(1, 10)  # at most ~10 x (10 + a few) of the 200 steps are spent on the kills
        for line in p.stdout:
            if line.startswith("step ") and "val" not in line:
                wait -= 1
                if wait == 0:
                    break
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere in the steps that follow: forward, update, checkpoint
        p.send_signal(signal.SIGKILL)
        err = p.communicate()[1]
        assert p.returncode in (0, -signal.SIGKILL), err[-2000:]
        if p.returncode == 0:  # it finished first (never seen; allowed)
            break
        kills += 1
        last = checkpoint.find_checkpoint(out)
        assert last and checkpoint.load_checkpoint(last)["step"] >= 1  # complete and readable after every kill
    for _ in range(2):  # resume to the end; then again: the run is complete, which is one line and exit 0
        r = subprocess.run(cli(dict(cfg, init_from="resume"), data_root, out), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "is at step 200 = max_iters: the run is complete" in r.stdout
    final = checkpoint.load_checkpoint(checkpoint.find_checkpoint(out))
    assert final["step"] == 200
    expect = ref["model"].state_dict()
    assert all(torch.equal(final["model"][k], expect[k]) for k in expect)  # bit for bit
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-0000199.pt", "ckpt-0000200.pt"]  # keep_last=2
    assert "best.pt" in names and not [n for n in names if ".tmp" in n]

def test_sigterm_checkpoints_and_exits(data_root, tmp_path):
    import signal
    import time
    p = subprocess.Popen(cli(dict(max_iters=100000, eval_interval=100000, device="cpu"), data_root, tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait for training to be under way
        if line.startswith("step 3:"):
            break
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and time.time() - t0 < 10, err[-2000:]
    assert "signal received" in out
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path))
    assert 3 <= ck["step"] < 1000 and ck["config"]["max_iters"] == 100000


def test_sigterm_during_evaluation_checkpoints_at_once(data_root, tmp_path, monkeypatch):
    import signal
    import dataclasses
    real, batches = data.clm_batch, []

    def slow_batch(split, rows, n_rows, seed=None, step=None):  # the signal arrives during the second evaluation,
        batches.append(seed is None)                              # at its 3rd batch
        if sum(batches) == 64 + 3 and seed is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(split, rows, n_rows, seed, step)
    monkeypatch.setitem(data.OBJECTIVES, "clm", dataclasses.replace(data.OBJECTIVES["clm"], batch=slow_batch))
    s = train.train(tiny_cfg(data_root, tmp_path, max_iters=20, eval_interval=5, eval_iters=64))
    assert s["preempted"] and s["step"] == 5 and sum(batches) == 64 + 3  # no further batch, no further step
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path))
    assert ck["step"] == 5 and ck["last_eval"] == 0  # the interrupted evaluation is redone on resume
    rest = train.train(tiny_cfg(data_root, tmp_path, max_iters=20, eval_interval=5, eval_iters=64, init_from="resume"))
    assert rest["evals"][0][0] == 5 and rest["step"] == 20


def nan_after(monkeypatch, first_bad_call):
    """Make the model's loss NaN from the first_bad_call-th forward pass in training on."""
    calls, forward = [0], getattr(M.Transformer.forward, "unpoisoned", M.Transformer.forward)

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training:
            calls[0] += 1
            if calls[0] >= first_bad_call:
                loss = loss * float("nan")
        return logits, loss
    poisoned.unpoisoned = forward
    monkeypatch.setattr(M.Transformer, "forward", poisoned)


def test_nonfinite_steps_are_skipped_then_stop(data_root, tmp_path, monkeypatch):
    common = dict(eval_interval=1000, lr_decay_iters=20, dropout=0.0)
    clean = train.train(tiny_cfg(data_root, tmp_path / "clean", max_iters=3, **common))
    nan_after(monkeypatch, 4)  # steps 1-3 fine, then every step NaN
    s = train.train(tiny_cfg(data_root, tmp_path / "nan", max_iters=8, max_bad_steps=10, **common))
    assert s["bad_steps"] == 5
    a, b = clean["model"].state_dict(), s["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the skipped updates were never applied
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path / "nan"))
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    nan_after(monkeypatch, 4)
    with pytest.raises(train.UserError, match=r"stopping at step 7: 4 non-finite steps in a row at lr .*last good "
                                           r"checkpoint is .*ckpt-0000006.pt"):
        train.train(tiny_cfg(data_root, tmp_path / "stop", max_iters=20, checkpoint_interval=3, max_bad_steps=4,
                             **common))


def test_disk_full_keeps_previous_checkpoint(data_root, tmp_path, monkeypatch):
    saves, real_save = [0], torch.save

    def full_disk(obj, f):
        saves[0] += 1
        if saves[0] > 2:  # ckpt-5 and best are written, then the disk is full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, f)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint ckpt-0000010 .*No space left"
                                      r".*ckpt-0000005.pt is intact"):
        train.train(tiny_cfg(data_root, tmp_path, max_iters=20, eval_interval=5))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "ckpt-0000005.pt", "log.jsonl"]
    assert checkpoint.load_checkpoint(tmp_path / "ckpt-0000005.pt")["step"] == 5


@pytest.mark.slow
@pytest.mark.distributed
def test_dead_rank_fails_fast(data_root, tmp_path):
    import time
    t0 = time.time()
    r = launch_ranks("dist", "die", data_root, tmp_path, timeout=300)  # phase 'die' of test_distributed.dist_worker
    assert r.returncode != 0 and time.time() - t0 < 120
    assert not (tmp_path / "phasedie.pt").exists()


def test_out_dir_lock(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    with pytest.raises(common.UserError, match=f"in use by the run with pid {os.getppid()}"):
        train.train(tiny_cfg(data_root, out, max_iters=2, warmup_iters=0))
    assert sorted(p.name for p in out.iterdir()) == ["lock"]  # the live run's files are untouched
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "lock").write_text(f"{socket.gethostname()} {dead.stdout.strip()}")  # a killed run's lock: taken over
    s = train.train(tiny_cfg(data_root, out, max_iters=2, warmup_iters=0))
    assert s["step"] == 2 and not (out / "lock").exists()  # and released at the end
    with common.dir_lock(out):  # held by this process: a second run (here, resuming it) is refused while it lasts
        with pytest.raises(common.UserError, match="in use"):
            train.train(tiny_cfg(data_root, out, max_iters=4, warmup_iters=0, init_from="resume"))


# ------------------------------------------------------------------------------------------------
# bad checkpoints, data, inputs and values: refused before any work, in one line

def test_bad_checkpoints_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": {}, "x": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be read.*corrupted"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()  # the payload never ran
    checkpoint.save_file({"step": 1, "w": torch.ones(1000)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:700])
    with pytest.raises(ValueError, match="corrupted, truncated"):
        checkpoint.load_checkpoint(tmp_path / "cut.pt")


def test_bad_data_rejected_before_training(data_root, tmp_path):
    with pytest.raises(common.UserError, match="prepare.py"):
        train.train(tiny_cfg(tmp_path, tmp_path / "o", dataset="nothing_here"))
    with pytest.raises(ValueError, match="block_size"):
        train.train(tiny_cfg(data_root, tmp_path / "o", block_size=500_000))
    with pytest.raises(ValueError, match="smaller than the dataset's vocabulary"):
        train.train(tiny_cfg(data_root, tmp_path / "o", vocab_size=200))
    bad = tmp_path / "bad" / "trunc"
    bad.mkdir(parents=True)
    for f in ("meta.json", "train.bin", "val.bin"):
        (bad / f).write_bytes((Path(data_root) / "pystdlib" / f).read_bytes()[:1000 if f == "val.bin" else None])
    with pytest.raises(ValueError, match="truncated"):
        train.train(tiny_cfg(tmp_path / "bad", tmp_path / "o", dataset="trunc"))


def bad_inputs(data_root, tmp):
    """(description, config overrides or a callable that damages a copy of the data, expected message)."""
    src = Path(data_root) / "pystdlib"

    def corpus(name, damage):
        d = tmp / "bad" / name
        d.mkdir(parents=True)
        for f in ("meta.json", "train.bin", "val.bin"):
            (d / f).write_bytes((src / f).read_bytes())
        damage(d)
        return dict(data_root=str(tmp / "bad"), dataset=name)

    meta = json.loads((src / "meta.json").read_text())

    def edit_meta(d, **kw):
        (d / "meta.json").write_text(json.dumps(dict(meta, **kw)))

    def big_id(d, record=True):  # as prepare.py would write it (record=True), or a corpus older than *_max_id
        a = np.fromfile(d / "val.bin", dtype=np.uint16)
        a[100] = 300
        a.tofile(d / "val.bin")
        edit_meta(d, val_max_id=300) if record else (d / "meta.json").write_text(
            json.dumps({k: v for k, v in meta.items() if not k.endswith("_max_id")}))
    return [
        ("missing data folder", dict(dataset="nope"), "python prepare.py"),
        ("empty .bin", corpus("empty", lambda d: ((d / "val.bin").write_bytes(b""), edit_meta(d, val_tokens=0))),
         "is empty"),
        ("truncated .bin",
         corpus("trunc", lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:999])), "truncated"),
        ("meta.json missing", corpus("nometa", lambda d: (d / "meta.json").unlink()), "meta.json not found"),
        ("meta.json inconsistent", corpus("dtype", lambda d: edit_meta(d, dtype="uint32")), "truncated or stale"),
        ("meta.json broken", corpus("broken", lambda d: (d / "meta.json").write_text("{not json")),
         "not valid meta.json"),
        ("token id >= vocab", corpus("bigid", big_id), "token id 300 >= the model's vocab_size=257"),
        ("token id >= vocab, old meta.json", corpus("oldmeta", lambda d: big_id(d, False)),
         "token id 300 >= the model's"),
        ("block larger than val", dict(block_size=10 ** 6), "validation split has"),
        ("vocab smaller than data", dict(vocab_size=100), "smaller than the dataset's vocabulary"),
        ("n_embd % n_head", dict(n_embd=66), "n_embd=66 is not divisible by n_head=4"),
        ("n_head % n_kv_head", dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
        ("unknown preset", dict(model="gpt3"), "model='gpt3' is not allowed: model must be str 'tiny' | 'gpt2'"),
        ("fp16 on CPU", dict(dtype="float16"), "float16' needs a GPU"),
        ("bad dtype", dict(dtype="fp8"), "dtype='fp8' is not allowed"),
        ("bad parallel", dict(parallel="tp"), "parallel='tp' is not allowed"),
        ("fsdp without torchrun", dict(parallel="fsdp"), "needs torchrun"),
        ("cuda without a GPU", dict(device="cuda"), "no CUDA device"),
        ("bad activation checkpointing", dict(activation_checkpointing="some"),
         "activation_checkpointing='some' is not allowed"),
        ("resume with nothing to resume", dict(init_from="resume"), "holds no checkpoint"),
        ("missing checkpoint", dict(init_from=str(tmp / "nope.pt")), "not found"),
    ]


def test_bad_inputs_rejected_before_compute(data_root, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(train, "build_model", lambda *a, **k: called.append(1))  # no compute may start
    cases = bad_inputs(data_root, tmp_path)
    for name, overrides, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            train.train({**tiny_cfg(data_root, tmp_path / "o"), **overrides})
        assert message in str(e.value), f"{name}: {e.value}"
    assert not called and len(cases) == 21
    cached = json.loads((tmp_path / "bad" / "oldmeta" / "meta.json").read_text())  # computed once, then cached
    assert (cached["val_max_id"], cached["train_max_id"]) == (300, 256)


# a value of another type for each kind (str takes any text)
WRONG_TYPE = {int: "x", float: "x", str: None, bool: "maybe"}


def bad_values(key):
    """Values that break `key`'s declared constraint: the rule's own examples and one of the wrong type."""
    kind, r = common.constraint(train.RULES[key])
    return (r.bad if r else []) + ([WRONG_TYPE[kind]] if WRONG_TYPE[kind] else [])


def bad_values_of(annotation):
    kind, r = common.constraint(annotation)
    return (r.bad if r else []) + ([WRONG_TYPE[kind]] if WRONG_TYPE[kind] else [])


def test_every_key_has_a_constraint():
    assert set(train.RULES) == set(train.DEFAULTS)  # a new key must declare its rule beside its default
    for key in train.DEFAULTS:
        kind, r = common.constraint(train.RULES[key])
        assert kind in (int, float, str, bool) and (r is not None or kind is bool), key
        assert bad_values(key), key


def test_every_bad_value_is_one_line_before_any_work(data_root, tmp_path, monkeypatch, capsys):
    cases = [(key, v) for key in train.DEFAULTS for v in bad_values(key)]
    for key, value in cases:
        status, err = main_fails([f"--{key}={value}"], data_root, tmp_path, monkeypatch, capsys)
        assert status != 0 and err.count("\n") == 1 and "Traceback" not in err and f"{key}=" in err, (key, value, err)
    cross = [  # rules across keys, and what only setup or the model can tell
        (["--warmup_iters=50", "--max_iters=20"], "warmup_iters"),
        (["--warmup_iters=9", "--lr_decay_iters=8"], "warmup_iters"),
        (["--min_lr=0.1", "--learning_rate=0.01"], "min_lr"), (["--seq_len=64"], "seq_len"),
        (["--max_iters=0"], "max_iters=0"), (["--init_from=resume"], "init_from='resume'"),
        (["--model=bert-tiny"], "objective='clm'"), (["--n_embd=30", "--n_head=4"], "n_embd=30"),
        (["--n_kv_head=3", "--n_head=4"], "n_kv_head=3"), (["--dtype=float16"], "dtype='float16'"),
        (["--parallel=fsdp"], "parallel='fsdp'"), (["--device=cuda:3"], "device='cuda:3'"),
        (["--vocab_size=100"], "vocab_size=100"), (["--dataset=nothing"], "nothing"),
        (["--objective=classify", "--dataset=pystdlib"], "labels"), ([f"--init_from={tmp_path / 'no.pt'}"], "no.pt"),
        (["--max_iters"], "--max_iters"), (["--batch_sise=4"], "batch_sise"), ([str(tmp_path / "none.py")], "none.py"),
        (["--objective=span", "--model=tiny"], "objective='span' trains an encoder-decoder"),
        (["--dec_len=8"], "dec_len=8"),
        (["--optimizer=muon", "--parallel=fsdp"], "optimizer='muon' with parallel='fsdp'"),
        (["--label_fraction=0.5"], "label_fraction=0.5 picks labelled examples"),
        (["--span_targets=whole"], "span_targets='whole' is for objective='span'"),
        (["--eval_rouge=4"], "eval_rouge=4 scores generated targets"),
        (["--objective=span", "--span_targets=whole"], "the decoder's rows are 35 tokens, more than block_size=32"),
    ]
    for argv, named in cross:
        status, err = main_fails(argv, data_root, tmp_path, monkeypatch, capsys)
        assert status != 0 and err.count("\n") == 1 and "Traceback" not in err and named in err, (argv, err)
    assert len(train.DEFAULTS) == 69 and len(cases) == 117 and len(cross) == 26  # keys and cases covered


def test_cli_config_error_is_one_line_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--eval_intreval=5"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode != 0 and "did you mean 'eval_interval'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_seq_len_past_a_checkpoints_block_size_is_one_line(data_root, tmp_path, capsys):
    train.train(tiny_cfg(data_root, tmp_path / "a", block_size=32, max_iters=2, eval_interval=2, warmup_iters=0))
    capsys.readouterr()
    status = train.main([f"--data_root={data_root}", f"--out_dir={tmp_path / 'b'}", "--device=cpu", "--threads=1",
                         f"--init_from={tmp_path / 'a' / 'best.pt'}", "--seq_len=64", "--max_iters=2",
                         "--warmup_iters=0"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "seq_len=64 is longer than the model's block_size=32" in err, err
    assert not (tmp_path / "b").exists()


def test_cli_error_is_one_line_and_oom_is_named(data_root, tmp_path, monkeypatch, capsys):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--beta2=1.0"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "beta2=1.0" in r.stderr and "[0.0, 1.0)" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing prepared, nothing written

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(train, "train_step", oom)
    status = train.main([f"--data_root={data_root}", f"--out_dir={tmp_path / 'o'}", "--device=cpu", "--threads=1",
                         "--n_layer=1", "--n_embd=32", "--block_size=32", "--max_iters=2", "--warmup_iters=0",
                         "--eval_iters=1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "out of GPU memory at batch_size=8, seq_len=block_size" in err
    assert "activation_checkpointing='none'" in err and "Traceback" not in err


@pytest.mark.slow
def test_other_clis_check_every_argument_first(tmp_path, monkeypatch, capsys):
    import sample
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a: 1 / 0)  # nothing may be read before the checks
    cases = [(key, v) for key in sample.RULES for v in (common.constraint(sample.RULES[key])[1].bad
                                                        if common.constraint(sample.RULES[key])[1] else [])]
    cases += [(key, WRONG_TYPE[common.constraint(r)[0]]) for key, r in sample.RULES.items()
              if WRONG_TYPE[common.constraint(r)[0]]]
    cases += [("start", f"FILE:{tmp_path / 'missing.txt'}"), ("source", f"FILE:{tmp_path / 'missing.txt'}"),
              ("ckpt", str(tmp_path / "none.pt"))]
    assert {k for k, _ in cases} == set(sample.RULES)  # every argument of sample.py
    for key, value in cases:
        assert sample.main([f"--{key}={value}"]) == 2, (key, value)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err and "Traceback" not in err, (key, value, err)
    n_sample = len(cases)
    # bench.py: its own options (the rest are train.py's keys, checked as above)
    cases = [(key, v) for key, r in bench.RULES.items() for v in bad_values_of(r)]
    assert {k for k, _ in cases} == set(bench.RULES)  # every option of bench.py
    for key, value in cases + [("steps", None)]:
        with pytest.raises(common.UserError, match=key):
            bench.main([f"--{key}" if value is None else f"--{key}={value}", "--synthetic", "--device=cpu"])
    r = subprocess.run([sys.executable, str(REPO / "bench.py"), "--warmup=-1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "warmup=-1" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "bench.py"), "--estimate", "llama-70b"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'llama-7b'" in r.stderr, r.stderr  # presets named
    offline = common.UserError("tiktoken encoding 'gpt2' could not be loaded: tiktoken could not download its files")
    monkeypatch.setattr(prepare, "get_tokenizer", lambda name: (_ for _ in ()).throw(offline))
    with pytest.raises(common.UserError, match="bench.py --prepare times the gpt2 BPE, which cannot be loaded: "
                                               "tiktoken encoding 'gpt2'.*Set TIKTOKEN_CACHE_DIR") as e:
        bench.main(["--prepare", "--steps=2"])  # offline: one line naming the fix (not a --tokenizer it lacks)
    assert "\n" not in str(e.value) and "--tokenizer" not in str(e.value)
    # prepare.py: every argument, one line each, nothing written
    out = tmp_path / "prep"
    bad = [["--name="], ["--name=a/b"], ["--input=nope*.txt", "--name=x"], ["--input=x.txt"], ["--tokenizer=nope"],
           ["--out_dir=", "--name=x"], ["--workers=0"], ["--workers=two"], ["--classify=1"], ["--quiet=no"],
           ["--nam=x"], ["--val_fraction=1.5"], ["--val_docs=0"], ["--text_field="], ["--hf_config=sample-10BT"],
           ["--hf_dataset=x"], ["--append"], ["--seq2seq=1"], ["--classify", "--seq2seq"]]
    for argv in bad:
        r = subprocess.run([sys.executable, str(REPO / "prepare.py"), f"--out_dir={out}", *argv], capture_output=True,
                           text=True, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert argv[0].split("=")[0].lstrip("-")[:3] in r.stderr and not out.exists(), (argv, r.stderr)
    assert (n_sample, len(cases) + 1, len(bad)) == (21, 16, 19)  # cases per CLI, for the closing note


def test_finetune_architecture_mismatch_named(data_root, tmp_path):
    train.train(tiny_cfg(data_root, tmp_path / "pre", max_iters=5, eval_interval=5, warmup_iters=1))
    with pytest.raises(ValueError, match="trained with n_layer=2 but the config sets n_layer=3"):
        train.train(tiny_cfg(data_root, tmp_path / "ft", n_layer=3, init_from=str(tmp_path / "pre" / "best.pt")))
