"""Make the offline example dataset from files every Python installation has.

    python -m orchestrator.example_data text    # data/stdlib_text/*.parquet (the hf_text example)

text: which standard-library package a piece of English comes from (asyncio, email,
tkinter, unittest). Trained on docstrings; evaluated in distribution on held-out
docstrings and under a natural shift of style on the same packages' code comments and
on the messages of the exceptions they raise.
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

PACKAGES = ("asyncio", "email", "tkinter", "unittest")
MIN_WORDS = 5


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _first_paragraph(doc: str) -> str:
    return _clean(doc.strip().split("\n\n")[0])


def package_texts(package: str) -> dict[str, list[str]]:
    """Docstrings, comments and raised messages of one stdlib package (tests excluded)."""
    root = os.path.join(sysconfig.get_paths()["stdlib"], package)
    out: dict[str, list[str]] = {"docstrings": [], "comments": [], "errors": []}
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
                elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                    arg = node.exc.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        out["errors"].append(_clean(arg.value))
                    elif isinstance(arg, ast.JoinedStr):  # f-strings: keep the literal parts
                        out["errors"].append(_clean(" ".join(v.value for v in arg.values
                                                             if isinstance(v, ast.Constant))))
            block: list[str] = []
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.COMMENT:
                    block.append(tok.string.lstrip("#").strip())
                elif tok.type not in (tokenize.NL, tokenize.NEWLINE) and block:
                    out["comments"].append(_clean(" ".join(block)))
                    block = []
    return {k: sorted({t for t in v if len(t.split()) >= MIN_WORDS}) for k, v in out.items()}


def make_text(out: str, train_per_label: int = 80, test_per_label: int = 50, seed: int = 0) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "id_test": [], "ood_comments": [], "ood_errors": []}
    for package in PACKAGES:
        texts = package_texts(package)
        docs = list(rng.permutation(texts["docstrings"]))
        need = train_per_label + test_per_label
        if len(docs) < need:
            raise SystemExit(f"{package}: only {len(docs)} docstrings, need {need}")
        rows["train"] += [(t, package) for t in docs[:train_per_label]]
        rows["id_test"] += [(t, package) for t in docs[train_per_label:need]]
        for kind in ("comments", "errors"):
            picked = rng.permutation(texts[kind])[:test_per_label]
            rows[f"ood_{kind}"] += [(str(t), package) for t in picked]
    os.makedirs(out, exist_ok=True)
    for name, items in rows.items():
        order = rng.permutation(len(items))
        table = pa.table({"text": [items[i][0] for i in order], "label": [items[i][1] for i in order]})
        pq.write_table(table, os.path.join(out, f"{name}.parquet"))
    return {name: len(items) for name, items in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.example_data", description=__doc__,
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
