"""`minillama finetune` end to end on a tiny model: a classifier head learns (loss falls, test accuracy above
chance) and its folder is a transformers LlamaForSequenceClassification; a LoRA SFT writes a peft adapter
and merged weights that agree; a resumed fine-tune equals an uninterrupted one; bad input is one line."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from minillama.checkpoint import save_model
from minillama.cli import main
from minillama.config import preset
from minillama.model import Llama
from minillama.tokenizer import load_tokenizer
from minillama.train.finetune import FinetuneConfig, finetune

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POOLS = {"sport": "goal match team score coach league player win cup run ball field",
         "music": "song band guitar album concert piano singer tune chord drum stage melody",
         "food": "bread cheese soup recipe oven salt spice dinner pasta fruit cake kitchen"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A labelled .jsonl (3 topics, each with its own words), the same as prompt/completion pairs, and a tiny
    random Llama with a 320-piece tokenizer trained on them, saved as a Hugging Face folder."""
    from minillama.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    rng, common = random.Random(0), "the a and of today new big".split()
    records = []
    for _ in range(60):
        for label, pool in POOLS.items():
            words = [rng.choice(pool.split() if rng.random() < 0.6 else common) for _ in range(rng.randint(6, 12))]
            records.append({"text": " ".join(words), "label": label})
    (root / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "chat.jsonl").write_text("".join(json.dumps({"prompt": f"Topic of: {r['text']}", "completion": r["label"]})
                                             + "\n" for r in records))
    question = "Which category is this text: food, music, sport? Answer with the category only."
    train_tokenizer([r["text"] for r in records] + [question] * 20, 320, root / "tok")
    tok = load_tokenizer(root / "tok")
    config = preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=128, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_model(Llama(config).init_weights(0), root / "base", tokenizer=tok)
    return root


def run_config(tiny, name, **changes):
    return FinetuneConfig(**{"base": str(tiny / "base"), "data": str(tiny / "labelled.jsonl"), "out": str(tiny / name),
                             "seq_len": 128, "batch_size": 8, "warmup_steps": 5, "eval_every": 1000, **changes})


def log(run, key="loss"):
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e}


def test_classifier_learns_and_is_a_transformers_classifier(tiny):
    transformers = pytest.importorskip("transformers")
    finetune(run_config(tiny, "classify", task="classify", max_steps=60, lr=1e-3))
    run = tiny / "classify"
    losses = list(log(run).values())
    assert sum(losses[-10:]) < sum(losses[:10]) - 3  # from about ln 3 = 1.1 a step to well below
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["labels"] == ["food", "music", "sport"] and metrics["test"]["examples"] == 36
    assert metrics["test"]["accuracy"] >= 0.6  # chance is 1/3
    assert metrics["tfidf_full_text"]["accuracy"] > 0.9  # the topics' own words: easy for TF-IDF
    assert sum(map(sum, metrics["test"]["confusion"])) == 36 and metrics["seconds"] > 0
    assert (run / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # RUN/final: a LlamaForSequenceClassification with id2label, our logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    assert hf.config.id2label == {0: "food", 1: "music", 2: "sport"}
    from minillama.checkpoint.hf import read_folder
    from minillama.model import LlamaForSequenceClassification

    config, tensors = read_folder(run / "final", lambda t: t)
    ours = LlamaForSequenceClassification(config, 3)
    ours.load_state_dict(tensors)
    ids = torch.tensor([load_tokenizer(run / "final").encode("goal match team", bos=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), atol=1e-5, rtol=0)


def test_lora_sft_on_labels_writes_an_adapter_and_merged_weights_that_agree(tiny):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    finetune(run_config(tiny, "sft", lora=8, lora_alpha=16, max_steps=30, lr=1e-2))
    run = tiny / "sft"
    losses = list(log(run).values())
    assert sum(losses[-5:]) < sum(losses[:5])
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test_before", "test_after"} <= set(metrics) and metrics["test_after"]["examples"] == 36
    assert json.loads((run / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (run / "final" / "adapter_config.json").exists()  # else transformers would load it as peft
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "final").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny / "base")
    adapted = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=0)
    steps = sorted(p.name for p in run.iterdir() if p.name.startswith("step_"))
    assert not steps  # no step checkpoint at eval_every=1000; the resume test covers adapter checkpoints


@pytest.mark.parametrize("kind", ["lora-sft-packed", "full-classify"])
def test_resumed_finetune_equals_uninterrupted(tiny, kind):
    kw = dict(max_steps=8, eval_every=4, lr=3e-3, keep=5)
    kw |= dict(data=str(tiny / "chat.jsonl"), lora=4, lora_dropout=0.1, pack=True) if kind == "lora-sft-packed" \
        else dict(task="classify")
    finetune(run_config(tiny, f"{kind}-whole", **kw))

    def ctrl_c_after_3(trainer, entry):  # a real Ctrl-C: the step under way finishes and is saved
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune(run_config(tiny, f"{kind}-parts", **kw), on_step=ctrl_c_after_3)
    parts, whole = tiny / f"{kind}-parts", tiny / f"{kind}-whole"
    saved = parts / "step_000004"
    assert (saved / ("adapter_model.safetensors" if "lora" in kind else "model.safetensors")).exists()
    finetune(run_config(tiny, f"{kind}-parts", **kw, resume=True))
    assert log(parts) == log(whole) and len(log(whole)) == 8  # exactly: the same floats at every step
    assert log(parts, "val_loss") == log(whole, "val_loss")


def test_bad_data_is_one_line_naming_file_and_line(tiny, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    argv = ["finetune", str(tiny / "base"), "--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "2",
            "--seq-len", "128"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"minillama finetune: error: {data} line 2: no assistant turn: nothing to learn from (fix it, "
                   "or pass --on-bad-line skip to leave such lines out)")
    assert main(argv[:1] + ["no/such/base"] + argv[2:]) == 2
    assert "no/such/base: no such checkpoint" in capsys.readouterr().err
    assert main(argv + ["--seq-len", "4096"]) == 2
    assert "--seq-len 4096 is longer than" in capsys.readouterr().err


def test_help_lists_the_command_shape(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    for flag in ("BASE", "--data", "--out", "--task", "--lora", "--lora-alpha", "--max-steps", "--resume",
                 "--on-bad-line", "--pack", "--time-budget"):
        assert flag in out
    assert "--corpus" not in out and "--preset" not in out


@pytest.mark.slow
def test_two_processes_finetune_like_one(tiny):
    """torchrun: 2 processes (DDP), each half of every batch, reproduce one process's losses."""
    kw = dict(max_steps=4, eval_every=2, lr=3e-3, lora=4, lora_dropout=0.0)
    finetune(run_config(tiny, "ddp-one", **kw))
    c = run_config(tiny, "ddp-two", **kw)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minillama", "finetune",
            c.base, "--data", c.data, "--out", c.out, "--seq-len", "128", "--batch-size", "8", "--warmup-steps", "5",
            "--max-steps", "4", "--eval-every", "2", "--lr", "3e-3", "--lora", "4", "--lora-dropout", "0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert log(tiny / "ddp-two") == pytest.approx(log(tiny / "ddp-one"), abs=1e-4)
    assert (tiny / "ddp-two" / "adapter" / "adapter_model.safetensors").exists()
