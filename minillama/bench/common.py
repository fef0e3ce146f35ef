"""What every benchmark shares: the reference implementations (imported only here, from the optional
`bench` extra), a meter of how busy the machine was with other processes during a measurement, and a
process's peak memory."""

import os
import resource
import time

from minillama.config import UserError

EXTRA = "pip install -e '.[bench]'"


def peak_memory_mb() -> float:
    """This process's peak resident memory since it started its program (VmHWM). Not getrusage's
    ru_maxrss: Linux carries that across fork and exec, so every process the bench starts would report
    at least the bench's own size."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def import_transformers():
    """transformers, the reference the benchmarks compare against; minillama itself never imports it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"this benchmark compares against Hugging Face transformers, which is not installed: "
                        f"{EXTRA}") from None
    return transformers


def hf_twin(model):
    """transformers' LlamaForCausalLM holding the same weights as our `model`, loaded through the state dict."""
    from minillama.checkpoint.hf import config_to_hf

    transformers = import_transformers()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config_to_hf(model.config)))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    # a tied head is the embedding; older transformers keep a rotary table we do not
    if unexpected or [k for k in missing if k != "lm_head.weight" and "rotary" not in k]:
        raise RuntimeError(f"weights do not match transformers' names: missing {missing}, unexpected {unexpected}")
    return hf


class CpuMeter:
    """`with CpuMeter() as m:` measures wall time (m.seconds) and the share of all cores that *other*
    processes used meanwhile (m.others: /proc/stat's busy time minus our own CPU time; 0.0 = the machine
    was ours, 0.5 on 2 cores = one core was taken; None where /proc/stat does not exist)."""

    def __enter__(self):
        self.start = (time.perf_counter(), _busy_seconds(), time.process_time())
        return self

    def __exit__(self, *exc):
        wall, busy, own = time.perf_counter(), _busy_seconds(), time.process_time()
        self.seconds = wall - self.start[0]
        if busy is None or self.start[1] is None:
            self.others = None
        else:
            others = (busy - self.start[1]) - (own - self.start[2])
            self.others = max(0.0, others) / (self.seconds * os.cpu_count())


def _busy_seconds() -> float | None:
    """Seconds all cores have been busy since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
