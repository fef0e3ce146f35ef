"""Speed: transforms of a model into a faster model with the same numbers (fast.py), the C++ kernels they
call (kernels.py), and data-parallel training (distributed.py).

Where a decode step's time goes, SmolLM2-135M-Instruct Q4_1 (the shipped GGUF), batch 1, 280 tokens in the
cache, CPU time of one thread (so the figures hold on a busy machine; 2 threads split every matmul):

| part of a step (30 layers)                      |   ms | what it is                                      |
|-------------------------------------------------|------|-------------------------------------------------|
| norm + q/k/v + bias + rotary (`attn_in`)        |  1.8 | 0.88 M weights a layer                          |
| KV cache write (Python, model/cache.py)         |  0.6 | 4 views and 2 copies a layer                    |
| attention over the cache + o_proj (`attn_out`)  |  2.9 | 9 heads x 280 keys, 0.33 M weights a layer      |
| norm + SwiGLU + residual (`mlp`)                |  6.8 | 2.65 M weights a layer                          |
| the 30 layers together                          | 16.0 |                                                 |
| final norm + LM head (Q8_0, 49152 x 576)        |  2.7 | 28 M weights; was 13.7                          |
| the whole step                                  | 18.7 | was 38 eager, 29 with the layers in C++         |

Before: the eager PyTorch layer (every op dispatched from Python: ~70 a layer, ~2,100 a token) with the
block matmuls called one by one. The layers now run as three C++ calls each (FastDecoderLayer), and three
kernel fixes moved the rest: at::parallel_for needs -fopenmp to use the second thread (without it the
kernels ran on one); GCC turned the vector conversion of signed int8 into scalar code (the Q8_0 LM head
read 2 GB/s; widened as unsigned bytes it reads 11-13); Q4 blocks are dequantized through a 16-entry
table with one permute per 16 weights (1.3x the per-nibble conversion). What remains is reading weights:
~12-15 G weights/s a thread for Q4_0/Q4_1/Q8_0 blocks, 4-9 for bf16/f32 (bandwidth-bound).
"""
