"""`minillama finetune BASE --data FILE|CORPUS --out RUN [--task sft|classify] [--lora R]`: adapt a pretrained
checkpoint on the one training loop (loop.py), so logging, loss.png, the time budget, exact resume, checkpoints
and torchrun are those of `train`. What changes is the batches, the loss module and what a checkpoint holds:

- sft: the chat conversations of a .jsonl, the loss on the assistant's tokens only (data/sft.py); or a
  labelled corpus, the question "which category?" answered by the label (data/labelled.py), and then
  RUN/metrics.json compares the generated answer's test accuracy before and after;
- classify: LlamaForSequenceClassification, a score head on the last token of that question, and
  RUN/metrics.json + RUN/confusion.png: test accuracy, macro-F1, confusion matrix, beside TF-IDF + logistic
  regression fit on the same split in the same run;
- --lora R: the base frozen, LoRA on the decoder's linears (perf/lora.py). Step checkpoints are then peft
  adapter folders (checkpoint/peft.py), RUN/adapter is the final adapter, RUN/final the merged weights.
RUN/final is always a Hugging Face folder with the tokenizer (for classify, with id2label).
"""

import copy
import functools
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minillama.checkpoint import run_state
from minillama.checkpoint.atomic import write_atomic
from minillama.config import LORA_TARGETS, TrainConfig, UserError, option
from minillama.data.examples import BadLines, ExampleBatches
from minillama.train.loop import in_processes, note_warmup, open_run, run_loop
from minillama.train.report import TrainResult, si
from minillama.train.trainer import Trainer


@dataclass
class FinetuneConfig(TrainConfig):
    """Everything `minillama finetune` takes: TrainConfig's loop and optimizer fields (a few defaults
    differ), a base checkpoint instead of a preset and a corpus, and fine-tuning's own fields."""
    base: str = option("", "checkpoint to start from: anything load_model reads, or smollm2", cli=False)
    data: str = option("", "sft: .jsonl of {\"messages\": [...]} or {\"prompt\", \"completion\"}, or a "
                           "labelled corpus; classify: a labelled corpus (bbc-news, a folder per label, .jsonl "
                           "with text and label)", required=True)
    task: str = option("sft", "sft: loss on the assistant's tokens; classify: a score head on the last token",
                       choices=["sft", "classify"])
    lora: int | None = option(None, "LoRA rank R: train low-rank adapters on the frozen base (default: train "
                                    "every weight)")
    lora_alpha: float = option(16.0, "LoRA scale: the update is alpha / R x B A")
    lora_dropout: float = option(0.05, "dropout on the input of the LoRA path")
    lora_targets: list[str] = option(list(LORA_TARGETS), "the decoder's linears that get LoRA", nargs="+")
    lora_layers: int | None = option(None, "LoRA on the last N decoder layers only (default all): the backward "
                                           "pass stops below them, a faster fine-tune on a CPU")
    pack: bool = option(False, "sft: pack several examples into a row; attention stays inside each one")
    on_bad_line: str = option("stop", "an example that is not JSON, has no assistant turn or is longer than "
                                      "--seq-len: stop there, or skip it with a warning", choices=["stop", "skip"])
    test_fraction: float = option(0.2, "labelled data: examples held out for the test split (stratified)")
    # pretraining's defaults that fine-tuning changes
    seq_len: int = option(512, "T: the longest example in tokens (classify: longer texts are cut to fit)")
    batch_size: int = option(8, "B: examples (or packed rows) per optimizer step, over all processes")
    lr: float = option(2e-4, "peak learning rate (LoRA; full fine-tuning usually wants ~2e-5)")
    eval_every: int = option(50, "validation loss every N steps")
    val_fraction: float = option(0.1, "examples held out for validation")

    def check_source(self) -> None:
        if not self.base:
            raise UserError("no base model: give BASE (a checkpoint folder, a .gguf, or smollm2)")
        if not self.data:
            raise UserError("no data: give --data FILE or a labelled corpus")
        if self.lora is not None and (self.lora <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise UserError("--lora must be a positive rank, --lora-alpha positive, --lora-dropout in [0, 1)")
        if self.lora_layers is not None and (self.lora is None or self.lora_layers <= 0):
            raise UserError("--lora-layers N takes a positive N, with --lora R")
        fractions = (self.val_fraction, self.test_fraction)
        if not (all(0 < f < 1 for f in fractions) and sum(fractions) < 1):
            raise UserError("--val-fraction and --test-fraction must be in (0, 1) and leave training examples")
        if self.pack and self.task != "sft":
            raise UserError("--pack is for --task sft (a classifier reads one text per row)")
        if self.fsdp:
            raise UserError("finetune does not shard with --fsdp yet: run torchrun without it (DDP)")


def finetune(config: FinetuneConfig, on_step=None) -> TrainResult:
    """Fine-tune as configured; on_step as for train()."""
    return in_processes(_finetune, config, on_step)


def _finetune(c: FinetuneConfig, procs, on_step) -> TrainResult:
    from minillama.checkpoint import load_model_and_tokenizer

    started = time.perf_counter()
    c.check(procs.world_size)
    if c.task == "classify":
        from minillama.evaluate.classify import require_sklearn

        require_sklearn()  # before any work, not after training
    has_labels = c.task == "classify" or is_labelled(c.data)  # a missing --data fails here, before the load
    # plain: every weight a float32 nn.Linear or Embedding (a GGUF's blocks dequantized), what autograd and
    # LoRA work on; the fast path's few-row kernels have no backward
    base, tokenizer = load_model_and_tokenizer(c.base, plain=True)
    if c.seq_len > base.config.max_seq_len:
        raise UserError(f"--seq-len {c.seq_len} is longer than the context of {c.base} "
                        f"({base.config.max_seq_len} tokens): give --seq-len {base.config.max_seq_len} or less")
    run, found = open_run(c, procs)
    torch.manual_seed(c.seed)  # LoRA's initialisation and dropout; a resumed run restores the state it had
    data = FinetuneData(c, tokenizer, has_labels)
    model, loss = build_model(c, base, data.labels)
    model = model.to(procs.device).train()
    if found:
        restore_weights(found[0], model, run, lora=c.lora is not None)
    trainer = Trainer(model, c, world_size=procs.world_size, device=procs.device,
                      total_steps=c.max_steps or 10**9, loss=loss)
    if found:
        run_state.restore(trainer, found[0], c.max_steps)
    if procs.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{c.task} on {c.base} | {n / 1e6:.1f}M parameters, {trained / 1e6:.2f}M trained ({trained / n:.2%})"
              f" | examples {len(data.train)} train, {len(data.val)} val, {len(data.docs.get('test', []))} test | "
              f"batch {c.batch_size} x up to {c.seq_len} tokens", file=sys.stderr)
        note_warmup(trainer)
    save = functools.partial(save_checkpoint, trainer, run=run, tokenizer=tokenizer, c=c, procs=procs)
    result = run_loop(trainer, c, procs, run, data.batches(), save, on_step, flops_per_token(c, base.config))
    if procs.rank == 0 and data.labels is not None:
        metrics = test_metrics(c, trainer.model, tokenizer, data, run)
        metrics |= {"steps": result.steps, "seconds": round(time.perf_counter() - started, 1),
                    "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        write_atomic(run / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    procs.barrier()
    return result


# ---- data ----

def is_labelled(spec: str) -> bool:
    """A built-in corpus, a folder, or a .jsonl whose first record has a "label"."""
    from minillama.data.corpus import BUILTINS

    path = Path(spec)
    if spec in BUILTINS or path.is_dir():
        return True
    if not path.is_file():
        raise UserError(f"{spec}: no such file or folder, and not a built-in corpus (built-ins: "
                        f"{', '.join(BUILTINS)})")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(record := json.loads(first), dict) and "label" in record
    except json.JSONDecodeError:
        return False  # the SFT reader reports the line


class FinetuneData:
    """The examples of the run. Labelled data: a stratified split, kept as documents too (`docs`: full text,
    `fitted`: cut to --seq-len) for the test metrics; conversations: a seeded validation hold-out."""

    def __init__(self, c: FinetuneConfig, tokenizer, has_labels: bool):
        from minillama.data import labelled, sft

        self.c, self.labels, self.docs, self.fitted = c, None, {}, {}
        # padding is never attended to nor learnt: any id will do, the tokenizer's own pad if it has one
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        bad = BadLines(c.on_bad_line)
        if has_labels:
            docs = labelled.load_labelled(c.data, bad)
            self.labels = sorted({d.label for d in docs})
            split = labelled.stratified_split(docs, c.val_fraction, c.test_fraction)
            for name, part in zip(("train", "val", "test"), split):
                self.docs[name] = part
                self.fitted[name] = labelled.fit_texts(tokenizer, self.labels, part, c.seq_len)
            if c.task == "classify":  # the question -> the label's index
                make = functools.partial(labelled.classification_examples, tokenizer, labels=self.labels)
            else:  # the question -> the label as the answer
                make = functools.partial(labelled.answer_examples, tokenizer, labels=self.labels, seq_len=c.seq_len)
            self.train, self.val = make(self.fitted["train"]), make(self.fitted["val"])
        else:
            examples = sft.read_sft(c.data, tokenizer, c.seq_len, bad)
            if len(examples) < 2:
                raise UserError(f"{c.data}: one usable example; fine-tuning needs a validation one as well")
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
            held_out = set(order[:max(1, round(c.val_fraction * len(examples)))])
            self.train = [e for i, e in enumerate(examples) if i not in held_out]
            self.val = [e for i, e in enumerate(examples) if i in held_out]
        if bad.skipped:
            print(f"note: skipped {bad.skipped} bad example(s) of {c.data}", file=sys.stderr)

    def batches(self) -> ExampleBatches:
        c = self.c
        return ExampleBatches(self.train, self.val, c.batch_size, c.seed, self.pad_id,
                              c.seq_len if c.pack else None, c.eval_steps)


# ---- model ----

def build_model(c: FinetuneConfig, base, labels):
    """(model, loss module): the base for SFT, or a classifier on its decoder; with LoRA when asked."""
    from minillama.model import LlamaForSequenceClassification
    from minillama.train.loss import CausalLMLoss, ClassificationLoss

    model = base
    if c.task == "classify":
        # the pretrained decoder with a new head (the LM head is left behind), initialised as transformers
        # does: normal, std initializer_range 0.02
        model = LlamaForSequenceClassification(base.config, len(labels), labels, model=base.model).to(base.device)
        torch.nn.init.normal_(model.score.weight, std=0.02, generator=torch.Generator().manual_seed(c.seed))
    if c.lora is not None:
        from minillama.perf.lora import apply_lora

        n = base.config.n_layers
        layers = None if c.lora_layers is None else range(max(0, n - c.lora_layers), n)
        try:
            apply_lora(model, c.lora, c.lora_alpha, c.lora_dropout, c.lora_targets, layers, seed=c.seed)
        except ValueError as e:
            raise UserError(f"--lora-targets: {e}") from None
        if c.task == "classify":
            model.score.requires_grad_(True)  # the new head always trains
    return model, ClassificationLoss(model) if c.task == "classify" else CausalLMLoss(model)


def flops_per_token(c: FinetuneConfig, config) -> float:
    """A training step's FLOPs per token, for the MFU: LoRA on the top layers needs far fewer than 6N."""
    from minillama.model.calc import finetune_flops_per_token

    n = config.n_layers
    trained = n if c.lora is None or c.lora_layers is None else min(c.lora_layers, n)
    return finetune_flops_per_token(config, c.seq_len, trained, full=c.lora is None, lm_head=c.task == "sft")


# ---- checkpoints ----

def save_checkpoint(trainer, folder: Path, run: Path, tokenizer, c: FinetuneConfig, procs) -> None:
    """A full fine-tune: Hugging Face folders throughout. LoRA: step checkpoints are adapter folders; at the
    end RUN/adapter is written first (a resume from final reads it), then final with the merged weights."""
    from minillama.checkpoint.hf import write_model_files

    write = write_model_files
    if c.lora is not None and folder.name == "final":
        from minillama.checkpoint.peft import save_adapter

        if procs.rank == 0:
            save_adapter(trainer.model, run / "adapter", c.base)
        write = write_merged
    elif c.lora is not None:
        write = functools.partial(write_adapter_and_tokenizer, base=c.base)
    run_state.save_checkpoint(trainer, folder, tokenizer, c, procs, write_model=write)


def write_adapter_and_tokenizer(model, folder: Path, tokenizer, base: str) -> None:
    from minillama.checkpoint.peft import write_adapter_files

    write_adapter_files(model, folder, base)
    tokenizer.save(folder)


def write_merged(model, folder: Path, tokenizer) -> None:
    """The LoRA model with its adapters folded into the weights, as a Hugging Face folder."""
    from minillama.checkpoint.hf import write_model_files
    from minillama.perf.lora import merge_lora

    write_model_files(merge_lora(copy.deepcopy(model)), folder, tokenizer)


def restore_weights(folder: Path, model, run: Path, lora: bool) -> None:
    """The trained weights of a checkpoint into the freshly built model: the adapter under LoRA (final's is
    RUN/adapter), else the whole Hugging Face folder."""
    if lora:
        from minillama.checkpoint.peft import load_adapter

        load_adapter(folder if (folder / "adapter_config.json").exists() else run / "adapter", model)
        return
    from minillama.checkpoint.hf import read_folder

    tensors = read_folder(folder, lambda t: t)[1]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = ["lm_head.weight"] if model.config.tie_embeddings else []
    if [m for m in missing if m not in tied] or unexpected:
        raise UserError(f"{folder}: its weights do not fit this run's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); resume with the same BASE and --task")


# ---- the test split ----

def test_metrics(c: FinetuneConfig, model, tokenizer, data: FinetuneData, run: Path) -> dict:
    """classify: the head's scores and TF-IDF's on the test split; SFT on labels: the generated answer's
    scores before (the base model) and after fine-tuning."""
    from minillama.data.labelled import classification_examples, prompt_ids
    from minillama.evaluate import classify as ev

    labels, test = data.labels, data.fitted["test"]
    truth = [labels.index(d.label) for d in test]
    if c.task == "classify":
        examples = classification_examples(tokenizer, test, labels)
        result = ev.scores(truth, ev.head_predictions(model, examples, data.pad_id), labels)
        ev.plot_confusion(result, labels, run / "confusion.png", f"{Path(c.data).name}: classifier head")
        pairs = lambda docs: [(d.text, labels.index(d.label)) for d in docs]  # noqa: E731
        return {"task": "classify", "labels": labels, "test": result,
                "tfidf_full_text": ev.tfidf_baseline(pairs(data.docs["train"]), pairs(data.docs["test"]), labels),
                "tfidf_same_text": ev.tfidf_baseline(pairs(data.fitted["train"]), pairs(test), labels)}
    from minillama.checkpoint import load_model_and_tokenizer

    prompts = [prompt_ids(tokenizer, labels, d.text) for d in test]
    after = ev.scores(truth, ev.generated_predictions(model, tokenizer, prompts, labels)[0], labels)
    ev.plot_confusion(after, labels, run / "confusion.png", f"{Path(c.data).name}: generated answer after SFT")
    base = load_model_and_tokenizer(c.base, plain=True)[0]  # as the fine-tune started, computed the same way
    before = ev.scores(truth, ev.generated_predictions(base, tokenizer, prompts, labels)[0], labels)
    return {"task": "sft", "labels": labels, "test_before": before, "test_after": after}


# ---- command line ----

def finetune_flags(p) -> None:
    from minillama.checkpoint.load import MODEL_HELP
    from minillama.cli import add_fields

    p.add_argument("base", metavar="BASE", help=MODEL_HELP)
    add_fields(p, FinetuneConfig, skip=("corpus", "preset", "config", "vocab_size", "tokenizer", "data_dir"))


def finetune_command(args) -> None:
    import os

    from minillama.cli import from_fields

    c = from_fields(FinetuneConfig, args)
    result = finetune(c)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
        print(f"fine-tuned {result.steps} steps: loss {result.loss:.3f}{val}, {si(result.tokens_per_s)} tok/s; "
              f"wrote {result.checkpoint}")
        metrics = Path(c.out) / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            for name, key in (("test", "test"), ("tf-idf", "tfidf_full_text"), ("before", "test_before"),
                              ("after", "test_after")):
                if key in m:
                    print(f"{name}: accuracy {m[key]['accuracy']:.1%}, macro-F1 {m[key]['macro_f1']:.3f}")
