"""The evaluation report of a checkpoint: top-1 by shot group (final epoch, and the best evaluated epoch,
labelled), the largest confusions, and the paper's Table 4 feature-space scores
(docs/method.md, "Feature-space scores"), written as report.md, report.json, class_centres.npy and pictures.

    mixtail eval runs/x/checkpoint.pt --report runs/x/report --class-vectors vectors.npz

The scores are plain numpy on arrays; `trainer.evaluate.feature_centres` computes the centres from a loader.
Centres are means of the *pooled backbone features* over the training set: the paper does not name the
layer, so we take these and say so (docs/method.md, "Feature-space scores"). A class with no training image
has a NaN centre; every score then skips it (it is neither a k nor a j in the sums, and C counts only the
classes with a centre).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mixtail.errors import DataError
from mixtail.pipelines.sources.subsets import shot_groups

GROUPS = ("all", "many", "medium", "few")
TAU_PRIME = 10.0  # the paper's Eq. 7: IS_k = exp(−(1/C)·Σ_j ‖c_k − c_j‖ / τ'), τ' = 10


class Confusion(NamedTuple):
    true: str
    predicted: str
    count: int
    fraction: float  # of the true class's test images


# --------------------------------------------------------------------------------------------------
# Class centres and the Table 4 scores
# --------------------------------------------------------------------------------------------------


def class_centres(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """c_k = mean of the features (N, D) whose label is k: (C, D) float32, NaN rows for absent classes."""
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {features.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features.astype(np.float64))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan).astype(np.float32)


def _present(centres: np.ndarray) -> np.ndarray:
    return ~np.isnan(centres).any(axis=1)


def inter_class_scores(centres: np.ndarray, tau: float = TAU_PRIME) -> np.ndarray:
    """IS_k = exp(−(1/C)·Σ_j ‖c_k − c_j‖₂ / τ') per class (C,) float64; NaN for a class without a centre.

    Lower is better: centres further apart. The sum includes j = k (a zero term), as the paper's Eq. 7 is written.
    """
    centres = np.asarray(centres, dtype=np.float64)
    ok = _present(centres)
    c = centres[ok]
    dist = np.sqrt(np.maximum(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), 0.0))  # (C', C')
    out = np.full(len(centres), np.nan)
    if len(c):
        out[ok] = np.exp(-dist.mean(axis=1) / tau)
    return out


def _cosine_matrix(x: np.ndarray) -> np.ndarray:
    # A zero vector has no direction: its similarities are 0 rather than NaN.
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norm > 0, norm, 1.0)
    return unit @ unit.T


def semantic_similarity_rows(centres: np.ndarray, class_vectors: np.ndarray) -> np.ndarray:
    """Row i of SS: (1/C)·Σ_j |Ss_ij − Sc_ij| (C,) float64, Ss / Sc the cosine-similarity matrices of the
    class vectors (C, d) and of the centres (C, D). SS(all) is the mean of the rows. NaN for a class without
    a centre. Lower is better: the feature space keeps the classes' semantic neighbourhoods."""
    centres = np.asarray(centres, dtype=np.float64)
    vectors = np.asarray(class_vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) != len(centres):
        raise ValueError(f"class_vectors must be (C, d) with C = {len(centres)}, got shape {vectors.shape}")
    ok = _present(centres)
    out = np.full(len(centres), np.nan)
    if ok.any():
        out[ok] = np.abs(_cosine_matrix(vectors[ok]) - _cosine_matrix(centres[ok])).mean(axis=1)
    return out


def group_means(per_class_scores: np.ndarray, train_counts: np.ndarray) -> dict[str, float | None]:
    """Mean of a per-class score over all classes and over each shot group; None for a group with no
    classes (or none with a score)."""
    scores = np.asarray(per_class_scores, dtype=np.float64)
    if scores.shape != (len(train_counts),):
        raise ValueError(f"per_class_scores must be ({len(train_counts)},), got shape {scores.shape}")
    groups = {"all": np.arange(len(scores)), **shot_groups(train_counts)}
    out: dict[str, float | None] = {}
    for name in GROUPS:
        vals = scores[groups[name]]
        vals = vals[~np.isnan(vals)]
        out[name] = float(vals.mean()) if len(vals) else None
    return out


# --------------------------------------------------------------------------------------------------
# Class vectors (GloVe)
# --------------------------------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def load_class_vectors(path: str | Path, class_names: list[str]) -> np.ndarray:
    """(C, d) float32 vectors for the run's classes, in class order, matched by name (case, `_` and spaces
    ignored). The .npz holds `names` and `vectors`, or several `<set>_names` / `<set>_vectors` pairs (a
    GloVe class-vector file for both CIFARs holds cifar10_*, cifar100_*), of which the best-matching pair is used."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class-vector file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz of class vectors ({err})") from None
    prefixes = [k[: -len("names")] for k in arrays if k.endswith("names") and k[: -len("names")] + "vectors" in arrays]
    if not prefixes:
        raise DataError(f"{path}: needs arrays 'names' and 'vectors' (or '<set>_names' and '<set>_vectors'), "
                        f"has {sorted(arrays)}")
    wanted = [_norm_name(n) for n in class_names]

    def table(prefix: str) -> dict[str, int]:
        names, vectors = arrays[prefix + "names"], arrays[prefix + "vectors"]
        if vectors.ndim != 2 or len(vectors) != len(names):
            raise DataError(f"{path}: '{prefix}vectors' must be ({len(names)}, d), got shape {vectors.shape}")
        return {_norm_name(n): i for i, n in enumerate(names)}

    tables = {p: table(p) for p in prefixes}
    # The pair that knows most of the classes; on a tie, the one with fewest extra names (CIFAR-10 over 100).
    best = max(prefixes, key=lambda p: (sum(w in tables[p] for w in wanted), -len(tables[p])))
    missing = [n for n, w in zip(class_names, wanted) if w not in tables[best]]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{path}: no vector for class {shown} (closest set: '{best}names')")
    rows = [tables[best][w] for w in wanted]
    return arrays[best + "vectors"][rows].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Confusions, the best evaluated epoch
# --------------------------------------------------------------------------------------------------


def top_confusions(labels: np.ndarray, preds: np.ndarray, class_names: list[str], k: int = 20) -> list[Confusion]:
    """The k largest off-diagonal cells of the confusion matrix, largest count first (ties: larger fraction
    of the true class, then class order)."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    num_classes = len(class_names)
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds differ in shape: {labels.shape} vs {preds.shape}")
    both = np.concatenate([labels, preds])
    if both.size and (both.min() < 0 or both.max() >= num_classes):
        raise ValueError(f"labels and preds must lie in [0, {num_classes})")
    cells = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    matrix = cells.reshape(num_classes, num_classes)
    per_true = matrix.sum(axis=1)
    np.fill_diagonal(matrix, 0)
    t, p = np.nonzero(matrix)
    counts = matrix[t, p]
    fractions = counts / per_true[t]
    order = np.lexsort((p, t, -fractions, -counts))[:k]
    return [Confusion(class_names[t[i]], class_names[p[i]], int(counts[i]), float(fractions[i])) for i in order]


def best_eval(metrics_jsonl_path: str | Path, by: str = "eval") -> dict | None:
    """The metrics.jsonl record {"epoch", "eval": {"all", "many", "medium", "few"}, ...} with the highest
    record[by]["all"] (the earliest on a tie): by="eval" picks on the test set, by="val" on the validation
    split (records without one are passed over); None when the run logged no such evaluation."""
    path = Path(metrics_jsonl_path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found")
    best = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if "eval" not in record or by not in record:
            continue
        score = record[by].get("all") if isinstance(record[by], dict) else None
        if not isinstance(score, (int, float)) or "epoch" not in record:
            raise DataError(f"{path}:{number}: an eval record needs 'epoch' and a numeric {by}.all")
        if best is None or score > best[by]["all"]:
            best = record
    return best


# --------------------------------------------------------------------------------------------------
# Pictures and the writer
# --------------------------------------------------------------------------------------------------

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}  # also plot_per_class


def plot_per_class(results: dict, train_counts: np.ndarray, classes: list[str], path: str | Path) -> None:
    """Per-class test accuracy (bars) against training count (line, log scale), classes sorted by count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    acc = np.array([np.nan if a is None else a for a in results["per_class"]])[order]
    group_of = {}
    for name, idx in shot_groups(counts).items():
        for k in idx:
            group_of[int(k)] = name
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.12 * len(counts), 20.0)), 4.0), dpi=120)
    x = np.arange(len(counts))
    ax.bar(x, acc, width=0.9, color=[GROUP_COLOURS[group_of[int(k)]] for k in order])
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("classes, sorted by training images")
    if len(counts) <= 30:
        ax.set_xticks(x, [classes[k] for k in order], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
    twin = ax.twinx()
    twin.plot(x, counts[order], color="black", linewidth=1.2)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in GROUP_COLOURS.values()]
    ax.legend(handles, [f"{g} ({'-' if results[g] is None else f'{results[g]:.1f}%'})" for g in GROUP_COLOURS],
              loc="upper right", fontsize=8)
    ax.set_title(f"Per-class accuracy: all {results['all']:.1f}%")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_centres_pca(centres: np.ndarray, class_names: list[str], train_counts: np.ndarray,
                     path: str | Path) -> None:
    """The class centres projected on their first two principal components, coloured by shot group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = np.asarray(centres, dtype=np.float64)
    ok = np.flatnonzero(_present(centres))
    if len(ok) == 0:
        raise ValueError("plot_centres_pca: every class centre is NaN (no training features)")
    x = centres[ok] - centres[ok].mean(axis=0)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    xy = np.zeros((len(ok), 2))
    xy[:, : min(2, vt.shape[0])] = x @ vt[:2].T  # fewer than 2 components: the missing axis stays 0
    explained = sv**2 / max((sv**2).sum(), 1e-300)
    group_of = {int(k): g for g, idx in shot_groups(train_counts).items() for k in idx}
    fig, ax = plt.subplots(figsize=(6.0, 5.0), dpi=120)
    for g, colour in GROUP_COLOURS.items():
        sel = [i for i, k in enumerate(ok) if group_of[int(k)] == g]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=colour, label=f"{g} ({len(sel)} cls)")
    if len(ok) <= 30:
        for i, k in enumerate(ok):
            ax.annotate(class_names[k], xy[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    pc = [f"PC{i + 1} ({100 * explained[i]:.0f}%)" if i < len(explained) else f"PC{i + 1}" for i in range(2)]
    ax.set_xlabel(pc[0])
    ax.set_ylabel(pc[1])
    ax.legend(fontsize=8)
    ax.set_title("Class centres (pooled backbone features, training set)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


_MD_SPECIAL = set("\\`*_[]<>|~#")


def md_cell(text: str) -> str:
    """`text` as one Markdown table cell that shows it as written: a class name holding `|` or a newline would
    otherwise split or end the row, and `*`, `_`, `<` would turn into emphasis or HTML. Punctuation Markdown
    reads is backslash-escaped; control characters show as their Python escapes (`\\n`)."""
    out = []
    for ch in str(text):
        if ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append("\\" + repr(ch)[1:-1])  # '\n' -> \\n, which renders as \n
        else:
            out.append(ch)
    return "".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"

    return [row(header), "|" + "---|" * len(header)] + [row(r) for r in rows]


def _groups_of(record: dict) -> dict[str, float | None]:
    return {g: (None if record.get(g) is None else float(record[g])) for g in GROUPS}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def write_report(out_dir: str | Path, *, final: dict, best: dict | None, train_counts: np.ndarray,
                 class_names: list[str], confusions: list[Confusion], scores: dict, centres: np.ndarray,
                 meta: dict, posthoc: list[tuple[float, dict]] | None = None,
                 posthoc_auto: dict | None = None) -> dict:
    """Write report.md, report.json, class_centres.npy, per_class_accuracy.png and class_centres_pca.png
    into out_dir; return the report.json dict.

    final: `evaluate(...)` of the checkpoint (all/many/medium/few, per_class, group_sizes, num_test_images).
    best: `best_eval(metrics.jsonl)`, the best evaluated epoch of the run, or None.
    confusions: `top_confusions(...)`. centres: (C, D) training-set class centres.
    scores: per-class arrays {"inter_class_score": (C,), "semantic_similarity_score": (C,) or None (no
    class vectors)}, from inter_class_scores / semantic_similarity_rows; averaged here per group.
    meta: anything that says what was evaluated (checkpoint, epoch, arch, dataset); copied to report.json.
    posthoc: optional (T, evaluate summary) pairs of the test logits shifted by T·log(P_Y/π).
    posthoc_auto: `--posthoc-tau auto`'s record: the validation grid, the T chosen on it, the test set at that T.
    With a validation split (final["val"]) its row stands beside the test row, and the best epoch is the one
    with the best validation accuracy (best must then come from best_eval(..., by="val")).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(train_counts)
    centres = np.asarray(centres, dtype=np.float32)
    if centres.ndim != 2 or len(centres) != len(class_names) or len(counts) != len(class_names):
        raise ValueError(f"centres ({centres.shape}), train_counts ({counts.shape}) and class_names "
                         f"({len(class_names)}) must agree on C")
    is_k = np.asarray(scores["inter_class_score"], dtype=np.float64)
    ss_rows = scores.get("semantic_similarity_score")
    ss_rows = None if ss_rows is None else np.asarray(ss_rows, dtype=np.float64)
    sizes = {g: int(len(v)) for g, v in shot_groups(counts).items()}

    by_val = "val" in final
    report = {
        "top1": _groups_of(final),
        "val_top1": _groups_of(final["val"]) if by_val else None,
        # A multi-expert model: top1 is its ensemble's; each expert's own rows beside it.
        "experts_top1": [_groups_of(e) for e in final["experts"]] if "experts" in final else None,
        "val_experts_top1": [_groups_of(e) for e in final["val"]["experts"]]
        if by_val and "experts" in final["val"] else None,
        "best_epoch": None if best is None else {
            "label": ("epoch with the best validation accuracy (test numbers; chosen on the validation split)"
                      if by_val else "best evaluated epoch (test set, as some peers report it; not the final model)"),
            "chosen_on": "val" if by_val else "test",
            "epoch": best["epoch"], "top1": _groups_of(best["eval"])},
        "inter_class_score": group_means(is_k, counts),
        "semantic_similarity_score": None if ss_rows is None else group_means(ss_rows, counts),
        "feature_scores_note": "class centres: mean pooled backbone feature over the training set"
                               + ("" if "experts" not in final else
                                  f" (the {len(final['experts'])} experts' pooled features side by side)")
                               + f"; IS with tau'={TAU_PRIME:g}, Euclidean; lower is better for both",
        "group_sizes": sizes,
        "num_test_images": final.get("num_test_images"),
        "top_confusions": [c._asdict() for c in confusions],
        "per_class": [{"name": name, "train_images": int(counts[k]),
                       "top1": final["per_class"][k] if "per_class" in final else None,
                       "inter_class_score": is_k[k],
                       "semantic_similarity_row": None if ss_rows is None else ss_rows[k]}
                      for k, name in enumerate(class_names)],
        "posthoc": None if posthoc is None else [{"tau": float(t), "top1": _groups_of(r)} for t, r in posthoc],
        "posthoc_auto": posthoc_auto,
        "router": None if "router" not in final else {
            "mean_experts": final["router"]["mean_experts"], "num_experts": final["router"]["num_experts"],
            "mean_experts_by_group": final["router"]["mean_experts_by_group"],
            "top1": _groups_of(final["router"]["routed"])},
        "meta": meta,
        "files": {"centres": "class_centres.npy", "per_class": "per_class_accuracy.png",
                  "pca": "class_centres_pca.png"},
    }
    report = _json_safe(report)

    np.save(out / "class_centres.npy", centres)
    plot_per_class(final, counts, class_names, out / "per_class_accuracy.png")
    plot_centres_pca(centres, class_names, counts, out / "class_centres_pca.png")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report, class_names) + "\n")
    return report


def _markdown(report: dict, class_names: list[str]) -> str:
    sizes = report["group_sizes"]
    head = ["", "All"] + [f"{g.capitalize()} ({sizes[g]} cls)" for g in GROUPS[1:]]
    meta = report["meta"]
    lines = ["# Evaluation report", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- test images: {report['num_test_images']}, classes: {len(class_names)}", "",
              "## Top-1 accuracy (%)", ""]
    rows = [["final epoch"] + [_fmt(report["top1"][g], 2) for g in GROUPS]]
    if report.get("val_top1"):
        rows.insert(0, ["final epoch, validation split"] + [_fmt(report["val_top1"][g], 2) for g in GROUPS])
        rows[1][0] = "final epoch, test set"
    if report.get("experts_top1"):  # the ensemble is the model; each expert's rows under it
        at = 1 if report.get("val_top1") else 0
        rows[at][0] += ", ensemble"
        rows[at + 1:at + 1] = [[f"final epoch, expert {k + 1}"] + [_fmt(e[g], 2) for g in GROUPS]
                               for k, e in enumerate(report["experts_top1"])]
        if report.get("val_experts_top1"):
            rows[0][0] += ", ensemble"
            rows[1:1] = [[f"final epoch, validation split, expert {k + 1}"] + [_fmt(e[g], 2) for g in GROUPS]
                         for k, e in enumerate(report["val_experts_top1"])]
    b = report["best_epoch"]
    if b is not None:
        what = (f"best validation epoch ({b['epoch']}), test set" if b.get("chosen_on") == "val"
                else f"best evaluated epoch ({b['epoch']})")
        rows.append([what] + [_fmt(b["top1"][g], 2) for g in GROUPS])
    lines += _md_table(head, rows)
    if b is not None and b.get("chosen_on") == "val":
        lines += ["", "The final epoch is the result; the epoch beside it was chosen on the validation split."]
    elif b is not None:
        lines += ["", "The final epoch is the result; the best evaluated epoch was picked on the test set and "
                      "is shown only beside it."]
    if report["posthoc"]:
        lines += ["", "### Post-hoc logit shift T·log(P_Y/π) on the test logits", ""]
        lines += _md_table(["T"] + head[1:], [[f"{p['tau']:g}"] + [_fmt(p["top1"][g], 2) for g in GROUPS]
                                               for p in report["posthoc"]])
    auto = report.get("posthoc_auto")
    if auto:
        lines += ["", f"### Post-hoc shift with T chosen on the validation split: T = {auto['tau']:g}", "",
                  f"Test set at T = {auto['tau']:g}: " + ", ".join(f"{g} {_fmt(auto['test'][g], 2)}" for g in GROUPS)
                  + ". The grid it was chosen from (validation split only):", ""]
        lines += _md_table(["T"] + head[1:], [[f"{r['tau']:g}"] + [_fmt(r[g], 2) for g in GROUPS]
                                               for r in auto["grid"]])
    router = report.get("router")
    if router:
        lines += ["", "### Stage-2 router (RIDE's expert assignment)", "",
                  f"Experts consulted per test image: {router['mean_experts']:.3f} of {router['num_experts']} "
                  f"(" + ", ".join(f"{g} {_fmt(v, 3)}" for g, v in router["mean_experts_by_group"].items()) + ").", ""]
        lines += _md_table(head, [["routed prediction"] + [_fmt(router["top1"][g], 2) for g in GROUPS]])
    lines += ["", "## Feature-space scores (paper Table 4; lower is better)", "",
              report["feature_scores_note"] + ".", ""]
    score_rows = [["inter-class score (IS)"] + [_fmt(report["inter_class_score"][g], 4) for g in GROUPS]]
    if report["semantic_similarity_score"] is None:
        score_rows.append(["semantic similarity (SS)"] + ["no class vectors"] + ["–"] * 3)
    else:
        score_rows.append(["semantic similarity (SS)"]
                          + [_fmt(report["semantic_similarity_score"][g], 4) for g in GROUPS])
    lines += _md_table(head, score_rows)
    lines += ["", f"## The {len(report['top_confusions'])} largest confusions", ""]
    lines += _md_table(["true class", "predicted", "images", "of the true class"],
                       [[c["true"], c["predicted"], str(c["count"]), f"{100 * c['fraction']:.1f}%"]
                        for c in report["top_confusions"]])
    files = report["files"]
    lines += ["", "## Pictures", "",
              f"- [per-class accuracy against training images]({files['per_class']})",
              f"- [class centres, 2-D PCA]({files['pca']})",
              f"- class centres (C × D, float32, class order): `{files['centres']}`"]
    return "\n".join(lines)
