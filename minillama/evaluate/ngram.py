"""The baseline a language model has to beat: a smoothed token n-gram model, counted with numpy.

p(x_i | x_1..x_{i-1}) is taken to depend on the last n-1 tokens only, and estimated from counts of
n-grams in the training tokens (Jurafsky & Martin, "Speech and Language Processing", ch. 3). Counts
alone give 0 to every n-gram the training text lacks, so they are smoothed:

- "kn": interpolated modified Kneser-Ney (Chen & Goodman 1998, "An Empirical Study of Smoothing
  Techniques for Language Modeling", §3.5-3.6), the strongest classic n-gram smoother. Every order
  subtracts a discount D(c) from each count and hands the mass it took to the next lower order,
  interpolated into every prediction (not only when the count is 0):
      p_k(w | h) = (max(c(hw) - D(c(hw)), 0) + gamma(h) · p_{k-1}(w | h')) / c(h·)
      gamma(h) = D1·N1(h·) + D2·N2(h·) + D3·N3+(h·)   (N_r(h·): words seen r times after h)
  with three discounts D1, D2, D3+ per order from its counts of counts. The lower orders count
  continuations, N1+(·hw) (how many different tokens precede hw), not occurrences: a token that only
  ever follows one word ("Francisco" after "San") should get little weight in new contexts. Below the
  unigrams sits the uniform 1/V, so no token ever has probability 0. A context never seen in training
  passes the lower order's probability through unchanged.
- "add-k": Laplace smoothing of the highest order (add-one when k = 1):
      p(w | h) = (c(hw) + k) / (c(h·) + k·V)

Both are proper distributions over the V tokens for every context (tested). The token stream is the
one the model trains on (BOS, document, EOS, BOS, ...), so document boundaries are tokens like any
other. Counting is vectorized: each n-gram is packed into one int64 (base V+1 digits; V+1 is the
"before the start" padding id) and counted with np.unique, so millions of tokens fit in seconds.

Shapes: N tokens, M predictions, n the order.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minillama.config import UserError

SMOOTHINGS = ("kn", "add-k")


@dataclass
class _Order:
    """Counts of one order k: the n-grams (sorted packed keys) and, per context h (the first k-1
    tokens), the sum of its counts and the mass gamma(h) that discounting freed."""
    keys: np.ndarray  # (G,) int64, sorted packed k-grams
    counts: np.ndarray  # (G,) int64: occurrences (highest order) or continuation counts (lower orders)
    context_keys: np.ndarray  # (H,) int64, sorted packed (k-1)-token contexts
    context_totals: np.ndarray  # (H,) c(h·), float64
    context_gamma: np.ndarray  # (H,) D1·N1(h·) + D2·N2(h·) + D3·N3+(h·), float64
    discounts: np.ndarray  # (4,) D(c) for c = 0, 1, 2, 3+ (D(0) = 0)


class NGramLM:
    """A token n-gram language model: `fit(ids)` on a training stream, `perplexity(ids)` on another."""

    def __init__(self, order: int, vocab_size: int, smoothing: str = "kn", discount: float | None = None,
                 k: float = 1.0):
        """discount: one fixed discount for every count and order (plain interpolated Kneser-Ney, as in
        hand calculations); None estimates modified KN's three discounts per order from the counts.
        k: the pseudo-count of add-k smoothing."""
        if smoothing not in SMOOTHINGS:
            raise UserError(f"smoothing {smoothing!r}: use one of {', '.join(SMOOTHINGS)}")
        if not isinstance(order, int) or order < 1:
            raise UserError(f"n-gram order must be a positive integer, got {order!r}")
        if vocab_size < 1:
            raise UserError(f"vocab_size must be positive, got {vocab_size}")
        if (vocab_size + 1) ** order >= 2**63:  # a packed n-gram must fit an int64
            longest = int(63 / math.log2(vocab_size + 1))
            raise UserError(f"order {order} n-grams of a {vocab_size}-token vocabulary do not fit an int64 "
                            f"key: use order <= {longest}")
        if discount is not None and not 0 < discount <= 1:
            raise UserError(f"discount must be in (0, 1], got {discount}")
        if k <= 0:
            raise UserError(f"add-k pseudo-count k must be positive, got {k}")
        self.order, self.vocab_size, self.smoothing = order, vocab_size, smoothing
        self.discount, self.k = discount, k
        self.base = vocab_size + 1  # digit V is the padding before the first token
        self.orders: list[_Order] = []  # index k-1 holds order k

    # ---- counting ----

    def fit(self, ids) -> "NGramLM":
        """Count the n-grams of a 1-D stream of token ids (the training tokens)."""
        ids = self._check_ids(ids)
        if len(ids) < self.order:
            raise UserError(f"{len(ids)} training tokens cannot hold one {self.order}-gram")
        keys = [ids]  # keys[k-1]: every k-gram of the stream, packed; k-gram j starts at token j
        for k in range(2, self.order + 1):
            keys.append(ids[:len(ids) - k + 1] * self.base ** (k - 1) + keys[-1][1:])
        self.orders = []
        for k in range(1, self.order + 1):
            if k == self.order or self.smoothing == "add-k":
                grams, counts = np.unique(keys[k - 1], return_counts=True)
            else:
                # continuation count of a k-gram: how many distinct (k+1)-grams end with it
                longer = np.unique(keys[k])  # the distinct (k+1)-grams
                grams, counts = np.unique(longer % self.base**k, return_counts=True)
            self.orders.append(self._order_table(grams, counts))
        return self

    def _order_table(self, grams: np.ndarray, counts: np.ndarray) -> _Order:
        discounts = self._discounts(counts)
        contexts, group = np.unique(grams // self.base, return_inverse=True)  # drop the last token
        capped = np.minimum(counts, 3)  # 1, 2 or 3+: which discount applies
        totals = np.bincount(group, weights=counts, minlength=len(contexts))
        gamma = np.bincount(group, weights=discounts[capped], minlength=len(contexts))
        return _Order(grams, counts, contexts, totals, gamma, discounts)

    def _discounts(self, counts: np.ndarray) -> np.ndarray:
        """D(c) for c = 0, 1, 2, 3+ from the counts of counts n_r (Chen & Goodman 1998, eq. 26):
        Y = n1 / (n1 + 2 n2), D_r = r - (r+1) · Y · n_{r+1} / n_r."""
        if self.smoothing == "add-k":
            return np.zeros(4)
        if self.discount is not None:
            return np.array([0.0, self.discount, self.discount, self.discount])
        n = np.bincount(np.minimum(counts, 5), minlength=5).astype(np.float64)  # n[r] = k-grams seen r times
        with np.errstate(divide="ignore", invalid="ignore"):
            y = n[1] / (n[1] + 2 * n[2])
            d = np.array([r - (r + 1) * y * n[r + 1] / n[r] for r in (1, 2, 3)])
        # tiny corpora leave some n_r at 0: fall back to 0.5; a positive D keeps mass for unseen tokens
        d = np.clip(np.nan_to_num(d, nan=0.5, posinf=0.5, neginf=0.5), 0.05, [1, 2, 3])
        return np.concatenate([[0.0], d])

    # ---- scoring ----

    def prob(self, history: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """p(target | history) for M predictions: history (M, n-1) token ids, the padding id V where
        the stream had not started; targets (M,). Returns (M,) float64."""
        if not self.orders:
            raise UserError("the n-gram model is not fitted: call fit(train_ids) first")
        M = len(targets)
        if self.smoothing == "add-k":
            top = self.orders[-1]
            context = self._pack(history)
            count = _lookup(top.keys, top.counts, context * self.base + targets)
            total = _lookup(top.context_keys, top.context_totals, context)
            return (count + self.k) / (total + self.k * self.vocab_size)
        p = np.full(M, 1.0 / self.vocab_size)  # below the unigrams: uniform
        context = np.zeros(M, dtype=np.int64)  # the empty context of the unigrams
        for k, table in enumerate(self.orders, start=1):
            if k > 1:  # extend the context one token further back
                context = context + history[:, self.order - k] * self.base ** (k - 2)
            count = _lookup(table.keys, table.counts, context * self.base + targets)
            total = _lookup(table.context_keys, table.context_totals, context)
            gamma = _lookup(table.context_keys, table.context_gamma, context)
            discounted = np.maximum(count - table.discounts[np.minimum(count, 3)], 0.0)
            seen = total > 0  # an unseen context keeps the lower order's estimate
            p = np.where(seen, (discounted + gamma * p) / np.where(seen, total, 1.0), p)
        return p

    def log_probs(self, ids) -> np.ndarray:
        """(N-1,) natural log p(ids[i] | the n-1 ids before it) for i = 1 .. N-1: every token but the
        first, the tokens a sliding-window evaluation of a model scores."""
        ids = self._check_ids(ids)
        padded = np.concatenate([np.full(self.order - 1, self.vocab_size, dtype=np.int64), ids])
        history = np.lib.stride_tricks.sliding_window_view(padded[:-1], self.order - 1)  # (N, n-1), no copy
        out = np.empty(len(ids) - 1)
        step = 1 << 20  # a million predictions at a time bounds the temporaries
        for start in range(1, len(ids), step):
            stop = min(start + step, len(ids))
            out[start - 1:stop - 1] = np.log(self.prob(history[start:stop], ids[start:stop]))
        return out

    def perplexity(self, ids) -> dict:
        """exp(mean negative log-likelihood) over every token but the first.
        Returns {"perplexity", "nll" (total, nats), "tokens" (scored)}."""
        logp = self.log_probs(ids)
        if not len(logp):
            raise UserError("need at least 2 token ids to score")
        nll = float(-logp.sum())
        return {"perplexity": math.exp(nll / len(logp)), "nll": nll, "tokens": len(logp)}

    def distribution(self, context) -> np.ndarray:
        """(V,) p(w | context) over the whole vocabulary; context is a list of ids (only the last n-1
        count, a shorter one is padded as the stream's start)."""
        context = [int(t) for t in context][-(self.order - 1):] if self.order > 1 else []
        row = [self.vocab_size] * (self.order - 1 - len(context)) + context
        history = np.tile(np.array(row, dtype=np.int64), (self.vocab_size, 1))  # (V, n-1)
        return self.prob(history, np.arange(self.vocab_size))

    def _pack(self, history: np.ndarray) -> np.ndarray:
        """(M, j) token columns -> (M,) int64 keys, the first column the most significant digit."""
        key = np.zeros(len(history), dtype=np.int64)
        for column in range(history.shape[1]):
            key = key * self.base + history[:, column]
        return key

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids).astype(np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"token id {ids.max() if ids.max() >= self.vocab_size else ids.min()} is outside "
                            f"the vocabulary of {self.vocab_size}")
        return ids


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query (keys sorted), 0 where the query is absent."""
    if not len(keys):
        return np.zeros(len(queries), dtype=values.dtype)
    i = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[i] == queries, values[i], 0)


# ---- command line: `minillama ngram RUN` ----

def ngram_flags(p) -> None:
    p.description = ("Fit a Kneser-Ney (or add-k) token n-gram model on RUN/data/train and print its perplexity "
                     "on RUN/data/val (every token but the first).")
    p.add_argument("run_folder", metavar="RUN", nargs="?", help="a run folder of `minillama train`")
    p.add_argument("--data", metavar="DIR", help="token shard folder with train/ and val/ (default RUN/data)")
    p.add_argument("--order", type=int, nargs="+", default=[3], help="n (several: one line each; default 3)")
    p.add_argument("--smoothing", choices=SMOOTHINGS, default="kn", help="default kn (modified Kneser-Ney)")


def ngram_command(args) -> None:
    from minillama.data.shards import TokenShards

    if not args.run_folder and not args.data:
        raise UserError("give a run folder (RUN) or --data DIR")
    folder = Path(args.data) if args.data else Path(args.run_folder) / "data"
    if not (folder / "train").is_dir() or not (folder / "val").is_dir():
        raise UserError(f"{folder}: no train/ and val/ token shards; run `minillama train` (or quickstart) "
                        "first, or give --data DIR")
    train, val = TokenShards(folder / "train"), TokenShards(folder / "val")
    vocab = train.index["vocab_size"]
    print(f"{train.num_tokens:,} training tokens, {val.num_tokens:,} validation tokens, vocab {vocab:,}",
          file=sys.stderr)
    train_ids, val_ids = train.tokens(), val.tokens()
    for order in args.order:
        lm = NGramLM(order, vocab, args.smoothing).fit(train_ids)
        r = lm.perplexity(val_ids)
        print(f"{order}-gram {args.smoothing}: validation perplexity {r['perplexity']:.3f} "
              f"over {r['tokens']:,} tokens")
