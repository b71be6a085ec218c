"""Make the offline example dataset from files every Python installation has.

    python -m orchestrator.example_data text    # data/stdlib_text/*.parquet (the hf_text example)

text: is a sentence of the standard library a docstring or a code comment? Trained on
four packages (asyncio, email, tkinter, unittest); evaluated in distribution on held-out
texts of the same packages and under a natural shift of topic on two others
(multiprocessing, xml). The label is one of style, not topic: mean-pooled sentence
embeddings, trained to capture what a sentence is about, separate it poorly, so the
linear probe leaves room for fine-tuning to show (which package a docstring comes from,
the earlier label, was a topic the probe already read off at 0.94).
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import sys
import sysconfig
import tokenize

import numpy as np

PACKAGES = ("asyncio", "email", "tkinter", "unittest")  # training and ID test
OOD_PACKAGES = ("multiprocessing", "xml")  # one OOD set each, named ood_<package>
KINDS = {"docstrings": "docstring", "comments": "comment"}  # package_texts key -> label
MIN_WORDS = 5


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _first_paragraph(doc: str) -> str:
    return _clean(doc.strip().split("\n\n")[0])


def package_texts(package: str) -> dict[str, list[str]]:
    """Docstrings and comments of one stdlib package (tests excluded)."""
    root = os.path.join(sysconfig.get_paths()["stdlib"], package)
    out: dict[str, list[str]] = {"docstrings": [], "comments": []}
    for folder, dirs, files in sorted(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if "test" not in d)
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                    doc = ast.get_docstring(node)
                    if doc:
                        out["docstrings"].append(_first_paragraph(doc))
            block: list[str] = []
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.COMMENT:
                    block.append(tok.string.lstrip("#").strip())
                elif tok.type not in (tokenize.NL, tokenize.NEWLINE) and block:
                    out["comments"].append(_clean(" ".join(block)))
                    block = []
    return {k: sorted({t for t in v if len(t.split()) >= MIN_WORDS}) for k, v in out.items()}


def labelled(package: str) -> dict[str, list[str]]:
    """label -> texts of one package; a text that is both a docstring and a comment is dropped."""
    texts = package_texts(package)
    both = set(texts["docstrings"]) & set(texts["comments"])
    return {label: [t for t in texts[kind] if t not in both] for kind, label in KINDS.items()}


def make_text(out: str, train_per_label: int = 70, test_per_label: int = 25, ood_per_label: int = 50,
              seed: int = 0) -> dict[str, int]:
    """Counts are per package and label: train 4 x 2 x 70 (the sweep holds out its val split
    from these), id_test 4 x 2 x 25, and 2 x 50 in each ood_<package>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "id_test": [], **{f"ood_{p}": [] for p in OOD_PACKAGES}}
    for package in PACKAGES + OOD_PACKAGES:
        ood = package in OOD_PACKAGES
        need = ood_per_label if ood else train_per_label + test_per_label
        for label, texts in labelled(package).items():
            if len(texts) < need:  # balanced sets, or none: a skewed label mix would flatter a biased model
                raise SystemExit(f"{package}: only {len(texts)} {label}s, need {need}")
            texts = [str(t) for t in rng.permutation(texts)]
            if ood:
                rows[f"ood_{package}"] += [(t, label) for t in texts[:ood_per_label]]
            else:
                rows["train"] += [(t, label) for t in texts[:train_per_label]]
                rows["id_test"] += [(t, label) for t in texts[train_per_label:need]]
    os.makedirs(out, exist_ok=True)
    for name, items in rows.items():
        order = rng.permutation(len(items))
        table = pa.table({"text": [items[i][0] for i in order], "label": [items[i][1] for i in order]})
        pq.write_table(table, os.path.join(out, f"{name}.parquet"))
    return {name: len(items) for name, items in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m orchestrator.example_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["text"], help="which dataset (text: the hf_text example's)")
    p.add_argument("--out", default=os.path.join("data", "stdlib_text"), help="output folder (default: data/stdlib_text)")
    args = p.parse_args(argv)
    out = args.out
    counts = make_text(out)
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
