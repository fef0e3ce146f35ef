"""How well a classifier does on held-out text: accuracy, macro-F1 and the confusion matrix (and its PNG);
the classical baseline on the same split, TF-IDF + logistic regression from scikit-learn; and predictions
of a classifier head, or of a chat model's generated answer (zero-shot, or after SFT on the labels).
"""

import io
from pathlib import Path

import torch
from tqdm import tqdm

from minillama.checkpoint.atomic import write_atomic
from minillama.config import UserError

SKLEARN_HINT = "pip install scikit-learn (or: pip install -e '.[classify]')"


def require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UserError(f"the TF-IDF baseline needs scikit-learn: {SKLEARN_HINT}") from None


def scores(true: list[int], predicted: list[int | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (the unweighted mean of each label's F1) and the confusion matrix, rows = true
    label, columns = predicted; a prediction of None (an answer naming no label) counts as wrong."""
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(true, predicted):
        if p is not None:
            confusion[t][p] += 1
    f1 = []
    for k in range(n):
        hits, predicted_k, actual_k = confusion[k][k], sum(row[k] for row in confusion), true.count(k)
        f1.append(2 * hits / (predicted_k + actual_k) if predicted_k + actual_k else 0.0)
    return {"accuracy": sum(t == p for t, p in zip(true, predicted)) / len(true), "macro_f1": sum(f1) / n,
            "examples": len(true), "unanswered": predicted.count(None), "confusion": confusion}


def plot_confusion(result: dict, labels: list[str], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    matrix = result["confusion"]
    fig = Figure(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 1.5), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{title}: accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_atomic(path, png.getvalue())


def tfidf_baseline(train: list[tuple[str, int]], test: list[tuple[str, int]], labels: list[str]) -> dict:
    """TF-IDF of words and word pairs (sublinear term frequency) + logistic regression, fit on the training
    (text, label) pairs and scored on the test ones: the classical classifier a language model must beat."""
    require_sklearn()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    features = vectorizer.fit_transform([text for text, _ in train])
    classifier = LogisticRegression(C=10.0, max_iter=2000).fit(features, [y for _, y in train])
    predicted = classifier.predict(vectorizer.transform([text for text, _ in test])).tolist()
    return scores([y for _, y in test], predicted, labels)


@torch.no_grad()
def head_predictions(classifier, examples, pad_id: int, batch_size: int = 8) -> list[int]:
    """The class each example's text gets from a LlamaForSequenceClassification."""
    from minillama.data.examples import collate

    was_training = classifier.training
    classifier.eval()
    predicted = []
    for i in tqdm(range(0, len(examples), batch_size), desc="test split: classifier head", unit="batch",
                  leave=False):
        batch = collate([[e] for e in examples[i:i + batch_size]], pad_id)
        predicted += classifier(batch["inputs"], batch["attention_mask"]).argmax(-1).tolist()
    classifier.train(was_training)
    return predicted


def parse_label(answer: str, labels: list[str]) -> int | None:
    """The label a generated answer names first (case-insensitive: "Sport." and "sports" are sport), or None."""
    answer = answer.lower()
    found = [(answer.find(label.lower()), -len(label), k) for k, label in enumerate(labels)
             if label.lower() in answer]
    return min(found)[2] if found else None


def generated_predictions(model, tokenizer, prompts: list[list[int]], labels: list[str],
                          batch_size: int = 8) -> tuple[list[int | None], list[str]]:
    """Greedy answers of a chat model to the prompts (ids, assistant turn open), and the label each names."""
    from minillama.config import GenerationConfig
    from minillama.infer.stream import generate

    was_training = model.training
    model.eval()
    answers = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="test split: generated answers", unit="batch",
                  leave=False):
        batch = prompts[i:i + batch_size]
        # 16 tokens: room for "The category is ...", as far as the context allows
        room = model.config.max_seq_len - max(len(p) for p in batch)
        config = GenerationConfig(max_new_tokens=max(1, min(16, room)), temperature=0.0)
        answers += [c.text for c in generate(model, tokenizer, batch, config)[0]]
    model.train(was_training)
    return [parse_label(a, labels) for a in answers], answers
