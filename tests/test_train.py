"""The trainer: the chunked loss equals the plain one, a short Shakespeare run learns and its checkpoint is
a transformers model, resuming is exact, two processes equal one, NaN stops with the last good checkpoint."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minillama.cli import main
from minillama.config import TrainConfig, UserError, parse_duration, preset
from minillama.model import Llama
from minillama.train.loop import train
from minillama.train.loss import CausalLMLoss, chunked_cross_entropy
from minillama.train.trainer import Trainer, bf16_supported, lr_at

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def losses(run, key="loss"):
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e}


# ---- the loss ----


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_chunked_cross_entropy_equals_plain(chunk_size):
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20]] = -100  # ignored rows (padding, prompts) count in neither the sum nor the mean
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = F.cross_entropy(h1 @ w1.T, targets)
    chunked = chunked_cross_entropy(h2, w2, targets, chunk_size)
    (plain * 3).backward()  # a non-unit incoming gradient must scale the saved ones
    (chunked * 3).backward()
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation skips the gradient work and gives the same value
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, chunk_size), plain.detach())


def test_chunked_cross_entropy_bfloat16_autocast_is_close():
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(64, 32), torch.randn(100, 32) * 0.1, torch.randint(0, 100, (64,))
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, w, targets, 16)
    loss.backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), atol=2e-2, rtol=1e-2)


def test_loss_module_equals_cross_entropy_of_the_logits():
    model = Llama(preset("tiny")).init_weights(0)
    tokens = torch.randint(0, 256, (2, 17))
    loss = CausalLMLoss(model, chunk_size=5)(tokens[:, :-1], tokens[:, 1:])
    logits = model(tokens[:, :-1])  # (B, T, V)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 0.1, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup reaches the peak on the last warmup step
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then only decays
    assert lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1) and lrs[-1] > 0.1


def test_weight_decay_only_on_matmul_weights():
    model = Llama(preset("tiny")).init_weights(0)
    trainer = Trainer(model, TrainConfig(batch_size=2, max_steps=1))
    decay, no_decay = trainer.optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("proj" in names[id(p)] or "lm_head" in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_trainer_accumulation_equals_one_big_batch():
    batch = torch.randint(0, 256, (8, 17))
    results = []
    for micro in (8, 2):
        model = Llama(preset("tiny")).init_weights(0)
        trainer = Trainer(model, TrainConfig(batch_size=8, micro_batch_size=micro, max_steps=3, warmup_steps=0))
        results.append([trainer.train_step(batch)["loss"] for _ in range(3)])
    assert results[0] == pytest.approx(results[1], abs=1e-5)


def run_steps(steps=4, **changes):
    model = Llama(preset("tiny")).init_weights(0)
    trainer = Trainer(model, TrainConfig(batch_size=4, max_steps=steps, warmup_steps=0, **changes))
    batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    return [trainer.train_step(batch)["loss"] for _ in range(steps)]


def test_activation_checkpointing_changes_nothing():
    assert run_steps(activation_checkpointing=True) == run_steps()  # recomputed activations are the same floats


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bfloat16 matmul, "
                    "so the trainer would fall back to float32 and the comparison would prove nothing")
def test_bfloat16_autocast_trains_close_to_float32():
    model = Llama(preset("tiny")).init_weights(0)
    assert Trainer(model, TrainConfig(dtype="bfloat16")).autocast_dtype == torch.bfloat16
    low, full = run_steps(dtype="bfloat16"), run_steps()
    assert low == pytest.approx(full, abs=0.05)
    assert low != full  # really computed in bf16: the rounding shows


def test_compile_matches_eager():
    assert run_steps(compile=True) == pytest.approx(run_steps(), abs=1e-4)


def test_parse_duration():
    assert [parse_duration(t) for t in ("90s", "5m", "1h30m", "12")] == [90, 300, 5400, 12]
    with pytest.raises(UserError, match="duration"):
        parse_duration("five minutes")


# ---- runs on Shakespeare ----

SMALL = dict(corpus=["shakespeare"], preset="tiny", seq_len=64, batch_size=16, lr=3e-3, warmup_steps=5,
             eval_steps=2)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """40 steps of the tiny model with a freshly trained 512-piece tokenizer; the data cache is shared."""
    root = tmp_path_factory.mktemp("train")
    config = TrainConfig(**SMALL, vocab_size=512, out=str(root / "run"), max_steps=40, eval_every=20,
                         save_every=10, data_dir=str(root / "data"))
    return root, train(config)


def small(root, name, **changes):
    """A run on the shakespeare fixture's tokenizer and token shards."""
    return TrainConfig(**(SMALL | dict(tokenizer=str(root / "run" / "tokenizer"), out=str(root / name),
                                       data_dir=str(root / "data")) | changes))


def test_a_short_run_scales_the_default_warmup_and_says_so(shakespeare, capsys):
    root = shakespeare[0]
    result = train(small(root, "short", max_steps=30, warmup_steps=None, eval_every=30))
    assert "note: warmup 3 steps, not 100" in capsys.readouterr().err
    lrs = [e["lr"] for e in map(json.loads, (root / "short" / "log.jsonl").read_text().splitlines())]
    assert result.steps == 30 and max(lrs) == lrs[2] == pytest.approx(SMALL["lr"])  # the peak, after 3 warmup steps
    assert lrs[-1] < SMALL["lr"] / 5  # and the cosine decays toward lr / 10
    explicit = Trainer(Llama(preset("tiny")), TrainConfig(max_steps=30, warmup_steps=20))
    assert explicit.warmup_steps == 20  # a warmup the user asked for is kept


def test_short_run_lowers_the_loss(shakespeare):
    root, result = shakespeare
    run = root / "run"
    train_loss, val_loss = losses(run), losses(run, "val_loss")
    assert sorted(train_loss) == list(range(1, 41)) and sorted(val_loss) == [20, 40]
    assert train_loss[1] > 6.0  # about ln(512) = 6.24 at the start
    assert train_loss[40] < train_loss[1] - 1.0 and val_loss[40] < val_loss[20]
    assert result.steps == 40 and result.val_loss == val_loss[40] and result.tokens_per_s > 0
    entry = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert set(entry) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the last 2 step checkpoints are kept, plus final; no temporary folders remain
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["final", "step_000020", "step_000030",
                                                                   "tokenizer"]
    assert (run / "final" / "training_state.pt").exists()


def test_final_checkpoint_loads_in_transformers(shakespeare):
    transformers = pytest.importorskip("transformers")
    from minillama.checkpoint import load_model
    from minillama.tokenizer import load_tokenizer

    final = shakespeare[0] / "run" / "final"
    ours, tokenizer = load_model(final), load_tokenizer(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    texts = ["To be, or not to be, that is the question:\nWhether 'tis nobler", "  Exeunt.  Ünïcödé 中文 2024"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            x = torch.tensor([ids])
            torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)


def test_resume_equals_uninterrupted_run_exactly(shakespeare):
    root = shakespeare[0]
    kw = dict(max_steps=12, eval_every=4, save_every=6, keep=5)
    train(small(root, "whole", **kw))

    def ctrl_c_after_6(trainer, entry):  # a real Ctrl-C: the loop finishes the step under way, saves, stops
        if entry["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(small(root, "parts", **kw), on_step=ctrl_c_after_6)
    assert (root / "parts" / "step_000007").is_dir() and not (root / "parts" / "final").exists()
    with pytest.raises(UserError, match="--resume"):  # never overwrite a run by accident
        train(small(root, "parts", **kw))
    result = train(small(root, "parts", **kw, resume=True))
    assert result.steps == 12
    whole, parts = root / "whole", root / "parts"
    assert losses(parts) == losses(whole)  # exactly: same floats, every step once
    assert losses(parts, "val_loss") == losses(whole, "val_loss")
    assert losses(parts, "lr") == losses(whole, "lr")


def test_nan_stops_and_keeps_the_last_good_checkpoint(shakespeare):
    root = shakespeare[0]

    def poison_after_step_3(trainer, entry):
        if entry["step"] == 3:
            with torch.no_grad():
                trainer.model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(UserError, match="step 4: loss nan.*step_000002"):
        train(small(root, "nan", max_steps=10, eval_every=2), on_step=poison_after_step_3)
    run = root / "nan"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("step", "final"))) == ["step_000002"]
    assert max(losses(run)) == 3  # the NaN step is not logged


def test_time_budget_stops(shakespeare):
    result = train(small(shakespeare[0], "budget", time_budget="3s", eval_every=1000))
    assert result.steps >= 5 and result.val_loss is not None and result.checkpoint.is_dir()


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--config", "no/such.json"], "no such config file"),
    (["--preset", "tiny", "--config", "x.json"], "exactly one of --preset"),
    (["--preset", "tiny", "--fsdp"], "torchrun"),
    (["--preset", "tiny", "--batch-size", "6", "--micro-batch-size", "4"], "multiple"),
])
def test_cli_user_errors_exit_2(tmp_path, capsys, args, message):
    argv = ["train", "--corpus", "shakespeare", "--vocab-size", "512", "--out", str(tmp_path / "r"),
            "--max-steps", "5", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bad_config_json_exits_2(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text("{not json")
    assert main(["train", "--corpus", "shakespeare", "--config", str(bad), "--vocab-size", "512",
                 "--out", str(tmp_path / "r"), "--max-steps", "5"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ---- several processes ----


def torchrun(config: TrainConfig, nproc=2, *extra):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "minillama",
            "train", "--corpus", *config.corpus]
    for name in ("out", "preset", "tokenizer", "data_dir", "seq_len", "batch_size", "micro_batch_size",
                 "max_steps", "lr", "warmup_steps", "eval_every", "eval_steps"):
        if getattr(config, name) is not None:
            args += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    done = subprocess.run(args + list(extra), capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_equal_one(shakespeare):
    root = shakespeare[0]
    kw = dict(max_steps=4, eval_every=2, micro_batch_size=4)  # 1 process: 4 micro-batches; 2: 2 each
    train(small(root, "one", **kw))
    torchrun(small(root, "two", **kw))
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(two) == [1, 2, 3, 4]
    assert two == pytest.approx(one, abs=1e-4)
    assert losses(root / "two", "val_loss") == pytest.approx(losses(root / "one", "val_loss"), abs=1e-4)
    assert (root / "two" / "final" / "model.safetensors").exists()


def test_fsdp_runs_equals_one_process_and_resumes(shakespeare):
    root = shakespeare[0]
    train(small(root, "fsdp_ref", max_steps=3, eval_every=2))
    torchrun(small(root, "fsdp", max_steps=2, eval_every=2), 2, "--fsdp")
    assert sorted(losses(root / "fsdp")) == [1, 2]
    from minillama.checkpoint import load_model

    assert load_model(root / "fsdp" / "final").config.vocab_size == 512
    torchrun(small(root, "fsdp", max_steps=3, eval_every=2), 2, "--fsdp", "--resume")  # sharded optimizer state
    assert losses(root / "fsdp") == pytest.approx(losses(root / "fsdp_ref"), abs=1e-4)


# ---- a mixture of experts (model/moe.py): the same trainer, the router losses added ----


def test_moe_trains_from_the_cli_and_resumes_exactly(shakespeare):
    root = shakespeare[0]
    kw = dict(preset="tiny-moe", max_steps=8, eval_every=4, save_every=4, warmup_steps=2)
    c = small(root, "moe_whole", **kw)
    argv = ["train", "--corpus", "shakespeare", "--out", c.out, "--tokenizer", c.tokenizer, "--data-dir", c.data_dir]
    for name in ("preset", "seq_len", "batch_size", "lr", "warmup_steps", "max_steps", "eval_every", "eval_steps",
                 "save_every"):
        argv += ["--" + name.replace("_", "-"), str(getattr(c, name))]
    assert main(argv) == 0
    whole = losses(root / "moe_whole")
    assert whole[8] < whole[1] - 0.5  # it learns

    def stop_after_4(trainer, entry):
        if entry["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small(root, "moe_parts", **kw), on_step=stop_after_4)
    train(small(root, "moe_parts", **kw, resume=True))
    assert losses(root / "moe_parts") == whole  # exactly
    assert losses(root / "moe_parts", "val_loss") == losses(root / "moe_whole", "val_loss")
    from minillama.checkpoint import load_model

    assert load_model(root / "moe_parts" / "final").config.n_experts == 4


def test_moe_two_processes_equal_one(shakespeare):
    """DDP: every expert gets a gradient in every step (idle ones zeros), so no parameter goes unreduced."""
    root = shakespeare[0]
    kw = dict(preset="tiny-moe", max_steps=3, eval_every=3, micro_batch_size=4)
    train(small(root, "moe_one", **kw))
    torchrun(small(root, "moe_two", **kw))
    assert losses(root / "moe_two") == pytest.approx(losses(root / "moe_one"), abs=1e-4)
    assert losses(root / "moe_two", "val_loss") == pytest.approx(losses(root / "moe_one", "val_loss"), abs=1e-4)
