"""Speed: transforms of a model into a faster model with the same numbers (fast.py), the C++ kernels they
call (kernels.cpp, built by kernels.py), and data-parallel training (distributed.py).

Where a decode step's time goes, SmolLM2-135M-Instruct Q4_1 (the shipped GGUF), batch 1, 280 tokens in the
cache, CPU time of one thread (so the figures hold on a busy machine; 2 threads split every matmul):

| part of a step (30 layers)                          | ms now | before | what it is                          |
|-----------------------------------------------------|--------|--------|-------------------------------------|
| norm + q/k/v + bias + rotary (`attn_in`)            |    1.6 |    1.8 | 0.88 M weights a layer              |
| KV cache write (Python, model/cache.py)             |    0.4 |    0.6 | narrow + copy_, 2 a layer           |
| attention + o_proj + norm + SwiGLU (`layer_out`)    |    7.2 |    9.7 | 9 heads x 280 keys, 2.98 M weights  |
| Python between the calls                            |    2.1 |    3.9 | the decode plan looked up once      |
| final norm + LM head (Q8_0, 49152 x 576)            |    1.9 |    2.7 | 28 M weights; was 13.7              |
| the whole step                                      |   13.2 |   18.7 | was 38 eager, 29 with layers in C++ |

Before: the eager PyTorch layer (every op dispatched from Python: ~70 a layer, ~2,100 a token) with the
block matmuls called one by one. The layers now run in one C++ call for all 30 (FastLlamaModel; two a
layer, FastDecoderLayer, for the server's paged cache), and kernel
fixes moved the rest: at::parallel_for needs -fopenmp to use the second thread (without it the kernels
ran on one); GCC turned the vector conversion of signed int8 into scalar code (the Q8_0 LM head read
2 GB/s; widened as unsigned bytes it reads 11-13); Q4 blocks are dequantized through a 16-entry table with
one permute per 16 weights (1.3x the per-nibble conversion), and on VNNI CPUs multiplied as integers with
activations rounded twice to int8 (1.3x again), the two parts held as one int16 for vpdpwssd (per row of
a batch 5 vector ops a block pair instead of 8: a 1536 x 576 matrix at 8 rows 265 -> 169 us); horizontal sums in registers (every dot product ends in
one: 1.5x the attention at 300 keys) and a vectorized exp. The Python between layers (~70 us a layer:
module calls, the cache write, views; the table's 2.1 ms) went with the one call for all layers, which
brought the step to 11.6 ms on one thread. Through `minillama generate` on 2 threads this decodes at
~1.1x llama.cpp on the same file (bench/generate.py: 154.6 vs 141.9 tok/s).

At batch 8 the weights are read once for eight rows and the step becomes arithmetic. Where its time goes
(perf record, the same file, 2 threads, samples of both): the Q4 matmuls 37% (5 vector ops per row per 64
weights), the Q8_0 LM head 12%, attention 12%, the second thread waiting at the ends of parallel loops
18% (the serial parts between them: norms, rounding the activations, rotary, Python), the garbage
collector 5% (the commands freeze the loaded model: gc.freeze). A step of 8 rows costs 2.8-3.1x a step
of one (batch 8 at 2.6-2.9x batch 1 through the CLI); three times batch 1 would need 2.67x.
"""
