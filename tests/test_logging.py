"""
Watching a run: log.jsonl, bits per byte, samples logged during training (sample_every), the wandb and
TensorBoard sinks, plot.py.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import logger
import model as M
import parallelize
import prepare
import train

from conftest import BERT_CFG, main_fails, split_of, t5_cfg, tiny_cfg


def test_bits_per_byte_on_the_bytes_corpus(data_root, tmp_path):
    """On the bytes corpus a token is a byte, but for the separator after each document (it has no bytes)."""
    train.train(tiny_cfg(data_root, tmp_path, max_iters=4, eval_interval=4, warmup_iters=2))
    val_files = [f for _, f in prepare.pystdlib_files()[::prepare.VAL_EVERY]]
    nbytes = sum(len(Path(f).read_bytes().decode("utf-8", errors="replace").encode()) for f in val_files)
    evals = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    for r in evals:  # nats per byte, over ln 2
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * (nbytes + len(val_files)) / nbytes / np.log(2), rel=1e-12)


def test_bits_per_byte_on_gpt2_by_hand(gpt2, tmp_path):
    texts = [f"# módulo {i}: ünïcode ✓ — 日本語\ndef f{i}(x):\n    return x * {i} + len('{'é' * i}')\n" * 3
             for i in range(40)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    folder = prepare.prepare("g", [str(tmp_path / "in.jsonl")], tokenizer="gpt2", out_dir=tmp_path / "data", quiet=True)
    val = [t for i, t in enumerate(texts) if i % prepare.VAL_EVERY == 0]
    nbytes, ntokens = sum(len(t.encode("utf-8")) for t in val), sum(len(gpt2.encode(t)) + 1 for t in val)  # + separator
    meta = data.load_meta(folder)
    # bytes, not characters
    assert (meta["val_bytes"], meta["val_tokens"]) == (nbytes, ntokens) and nbytes > len("".join(val))
    # a corpus prepared before these keys: counted by decoding, once, and cached in meta.json
    Path(folder, "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.endswith("_bytes")}))
    assert data.max_ids(folder) == meta == data.load_meta(folder)
    train.train(tiny_cfg(tmp_path / "data", tmp_path / "out", dataset="g", n_layer=1, n_embd=16, block_size=32,
                         batch_size=2, max_iters=1, eval_interval=1, eval_iters=1, warmup_iters=0))
    evals = [r for r in map(json.loads, open(tmp_path / "out" / "log.jsonl")) if "val_loss" in r]
    assert len(evals) == 2 and evals[0]["val_loss"] > 10  # ln(50257) = 10.8: the loss is per gpt2 token
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * ntokens / nbytes / np.log(2), rel=1e-12)


def test_sample_every_logs_greedy_continuation_and_mask_fill(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path / "clm", max_iters=10, eval_interval=10, log_interval=5,
                             sample_every=5))
    samples = [r for r in map(json.loads, open(tmp_path / "clm" / "log.jsonl")) if "sample" in r]
    assert [r["step"] for r in samples] == [5, 10]
    prompt = torch.from_numpy(data.load_split(data_root / "pystdlib", "val")[:data.SAMPLE_PROMPT]
                              .astype(np.int64))[None]
    out = s["model"].eval().generate(prompt, data.SAMPLE_TOKENS, temperature=0,
                                     use_cache=False)[0].tolist()  # the final model
    tok = prepare.get_tokenizer("bytes")
    assert (samples[-1]["sample"] == f"{tok.decode(out[:32])!r} -> {tok.decode(out[32:])!r}"
            and out[:32] == prompt[0].tolist())
    # BERT: the first validation pair, its masked tokens filled in, scored against the truth
    s = train.train(tiny_cfg(data_root, tmp_path / "mlm",
                             **{**BERT_CFG, "batch_size": 4, "eval_iters": 1, "warmup_iters": 2},
                             max_iters=4, eval_interval=4, sample_every=4))
    sample = [r for r in map(json.loads, open(tmp_path / "mlm" / "log.jsonl")) if "sample" in r][0]["sample"]
    b = data.mlm_nsp_batch(split_of("mlm_nsp", data_root / "pystdlib", "val", 64), range(1), 1)
    with torch.no_grad():
        (mlm, _), _ = s["model"].eval()(**data.to_device(b, torch.device("cpu")))
    t = torch.from_numpy(b["targets"])
    truth, pred = t.gather(1, M.mlm_positions(t)), mlm[..., :256].argmax(-1)  # bytes 0..255: text; 256 is the separator
    n = int((truth != -1).sum())
    assert f"({int(((pred == truth) & (truth != -1)).sum())}/{n} masked tokens right, next sentence " in sample
    assert sample.count("«") == sample.count("»") and 1 <= sample.count("«") <= n and " [SEP] " in sample


def test_t5_sample_every_logs_the_decoders_output(data_root, tmp_path):
    train.train(t5_cfg(data_root, tmp_path, max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=0, sample_every=2))
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    samples = [r["sample"] for r in recs if "sample" in r]
    # the source (its sentinels shown as <k>), then what the decoder wrote for it, greedily
    assert len(samples) == 1 and " -> " in samples[0] and "<0>" in samples[0].split(" -> ")[0], samples


def _wandb_history(run_dir):
    """The records a wandb offline run holds (its .wandb file: LevelDB log blocks of protobuf Records):
    (config, [history rows without wandb's own _keys])."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, piece, config, rows = next(Path(run_dir).glob("run-*.wandb")).read_bytes(), 7, b"", {}, []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        piece, pos = piece + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(piece)
            piece = b""
            items = lambda its: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in its}
            if rec.HasField("run"):
                config.update(items(rec.run.config.update))
            if rec.HasField("config"):
                config.update(items(rec.config.update))
            if rec.HasField("history"):
                rows.append({k: v for k, v in items(rec.history.item).items() if not k.startswith("_")})
    return config, rows


def test_wandb_sink_offline_same_records_and_resume(data_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(data_root, tmp_path, max_iters=4, eval_interval=2, log_interval=2, lr_decay_iters=8, wandb_log=True)
    train.train(cfg)
    run_id = (tmp_path / "wandb_id").read_text()
    train.train(dict(cfg, max_iters=8, init_from="resume"))  # the same wandb run continues
    assert (tmp_path / "wandb_id").read_text() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # (wandb adds "-1" to the second folder's name when both runs start within the same second)
    assert len(runs) == 2 and all(r.name.split("-")[3] == run_id for r in runs)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    # provenance, val 0, train 2, val 2, train 4, val 4 | provenance, train 6...
    for run, part in zip(runs, (log[:6], log[6:])):
        config, rows = _wandb_history(run)
        assert config["learning_rate"] == cfg["learning_rate"] and config["torch"] == torch.__version__
        by_step = {}
        for rec in part[1:]:  # wandb joins the records of a step into one row
            by_step.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
        assert rows == list(by_step.values())


def test_tensorboard_sink_same_records(data_root, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.train(tiny_cfg(data_root, tmp_path, max_iters=6, eval_interval=3, log_interval=2,
                         tensorboard_dir=str(tmp_path / "tb")))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for key in ("loss", "lr", "tok_s", "val_loss", "val_bpb"):
        want = [(r["step"], r[key]) for r in log if key in r]
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(k, pytest.approx(v, rel=1e-6))
                                                                    for k, v in want], key
    assert len(want) == 3 and "provenance/text_summary" in events.Tags()["tensors"]


def test_sinks_rank_0_only_and_missing_package_named(data_root, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(data_root, tmp_path, wandb_log=True, tensorboard_dir=str(tmp_path / "tb"))
    rank1 = parallelize.Runtime(torch.device("cpu"), torch.float32, rank=1, world=2)
    with logger.open_sinks(cfg, rank1, None) as sinks:
        assert sinks == []
    assert list(tmp_path.iterdir()) == []
    real = logger.importlib.util.find_spec
    monkeypatch.setattr(logger.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    for arg, package in (("--wandb_log=True", "wandb"), (f"--tensorboard_dir={tmp_path / 'tb'}", "tensorboard")):
        status, err = main_fails([arg], data_root, tmp_path, monkeypatch, capsys)
        assert status == 2 and err.count("\n") == 1 and f"pip install {package}" in err


def _two_runs(data_root, root):
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        train.train(tiny_cfg(data_root, root / name, max_iters=10, eval_interval=5, log_interval=2, learning_rate=lr,
                             min_lr=1e-4))
    with open(root / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 2.1')  # a run killed mid-write
    return [[json.loads(line) for line in (root / name / "log.jsonl").read_text().splitlines()[:n]]
            for name, n in (("a", None), ("b", -1))]


def test_plot_two_runs_one_torn(data_root, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    import plot
    logs = _two_runs(data_root, tmp_path)
    fig = plot.plot([str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl")], str(tmp_path / "p.png"))
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 rows of 3 panels (loss, loss against time, bits per byte; lr, tok/s, MFU), the legend below: 2 runs + 1 rows
    assert struct.unpack(">II", png[16:24]) == (1500, round((2 * 3.4 + 3 * 0.22) * 100))
    loss_ax, time_ax = fig.axes[:2]
    lines = [ln for ln in loss_ax.get_lines() if ln.get_lw() == 1.5]  # the smoothed training loss, one per run
    assert [t.get_text() for t in fig.legends[0].get_texts() + fig.legends[1].get_texts()] == [
        "a (learning_rate=0.003)", "b (learning_rate=0.001)"]
    for line, log in zip(lines, logs):
        train_recs = [r for r in log if "loss" in r]
        assert list(line.get_xdata()) == [r["step"] for r in train_recs] == [2, 4, 6, 8, 10]
        assert line.get_ydata()[0] == pytest.approx(train_recs[0]["loss"])
    val_lines = [ln for ln in time_ax.get_lines() if ln.get_marker() == "o"]
    assert [list(ln.get_xdata()) for ln in val_lines] == [[r["elapsed_s"] / 60 for r in log if "val_loss" in r]
                                                          for log in logs]
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_reads_a_resumed_log_as_one_run(tmp_path):
    import plot
    prov = lambda init: {"torch": "x", "config": {"init_from": init, "learning_rate": 1e-3}}
    # killed at 30
    lines = [prov("scratch")] + [{"step": k, "loss": 5 - k / 10, "elapsed_s": k} for k in range(0, 31, 10)]
    # from a checkpoint at 20
    lines += [prov("resume")] + [{"step": k, "loss": 4 - k / 10, "elapsed_s": k - 19} for k in (30, 40)]
    lines += [{"step": 40, "val_loss": 1.0, "elapsed_s": 22}, {"step": 40, "sample": "x"}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{torn")
    p, train_recs, val_recs = plot.read_log(tmp_path / "log.jsonl")
    assert p == prov("scratch") and list(train_recs) == [0, 10, 20, 30, 40] and list(val_recs) == [40]
    assert [r["loss"] for r in train_recs.values()] == [5, 4, 3, 1, 0]  # the resumed run's steps replace the others
    assert [r["elapsed_s"] for r in train_recs.values()] == [0, 10, 20, 41, 51] and val_recs[40]["elapsed_s"] == 52
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + [prov("scratch"), lines[1]]))
    assert list(plot.read_log(tmp_path / "log.jsonl")[1]) == [0]  # a fresh run in the same folder starts over


def test_plot_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import plot
    assert plot.main([str(tmp_path)]) == 2 and "no log.jsonl at" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text(json.dumps({"torch": "x", "config": {}}) + "\n")
    assert plot.main([str(tmp_path)]) == 2 and "holds no records of a run yet" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text(json.dumps({"torch": "x", "config": {}}) + "\n"
                                        + json.dumps({"step": 1, "loss": 2.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err


def test_plot_writes_into_the_run_and_shows_a_lone_point(tmp_path, capsys):
    """plot.py's default output is the first run's folder (not the working directory); a run with one logged point
    draws it as a marker, not an empty panel."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    import plot
    (tmp_path / "log.jsonl").write_text(json.dumps({"torch": "x", "config": {}}) + "\n" + json.dumps(
        {"step": 1, "loss": 2.0, "lr": 1e-3, "tok_s": 10, "mfu": 0.1, "elapsed_s": 1.0}) + "\n")
    assert plot.main([str(tmp_path)]) == 0 and f"wrote {tmp_path / 'plot.png'}" in capsys.readouterr().out
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot.plot([str(tmp_path)], str(tmp_path / "x.png"))
    panels = [ax for ax in fig.axes if any(len(ln.get_xdata()) for ln in ax.get_lines())]
    assert len(panels) == 5 and all(any(ln.get_marker() == "o" for ln in ax.get_lines()) for ax in panels)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_logged_numbers_add_up_and_name_what_ran(data_root, tmp_path):
    s = train.train(tiny_cfg(data_root, tmp_path, objective="mlm_nsp", model="bert-tiny", max_iters=4,
                             eval_interval=4, log_interval=2, seq_len=64, warmup_iters=1))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    prov, steps = records[0], [r for r in records if "grad_norm" in r]
    assert len(steps) == 2
    for r in steps:  # the loss and its parts, each a mean over the same steps
        assert abs(r["loss"] - r["mlm_loss"] - r["nsp_loss"]) < 2e-4, r
    c = prov["config"]
    assert c == s["config"] and (c["optimizer"], c["lr_decay_iters"], c["warmup_iters"]) == ("adamw", 4, 1)
    assert c["model"] == "bert-tiny" and c["objective"] == "mlm_nsp" and c["seq_len"] == 64
    assert None not in (c["block_size"], c["n_layer"], c["dropout"], c["vocab_size"])
