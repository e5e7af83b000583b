"""Words against meaning on a labelled set where exact tokens matter (issue #25): `qvlsearch eval` in its three
modes (semantic, words, hybrid), recall@1/@10 and MRR@10.

The library, made here: invoices as PDFs with real text layers, one page each ("Invoice 4711", a customer,
a total), their numbers neighbours of each other; photos with camera-style names (IMG_2043.JPG, DSC-0042.jpg);
notes in German, French and Chinese, each with a word of its own. The queries are what people remember of
such files: `invoice 4711`, `IMG_2043`, `Müller 17`, a two-character Chinese word. Each has one relevant file.

The model is the `tiny` checkpoint (random weights: no hub here), so the semantic column is what a model that
knows nothing finds (chance, about 10 / files for recall@10); with a real model it finds meanings, not
invoice numbers, which is why words exist. What this measures is the words index and the fusion: whether
words find exact tokens, and whether hybrid keeps them when fused with a ranking that does not help.

    python benchmarks/bench_words_eval.py [--per-kind N]     # N files of each kind (default 100)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import Figure, run_standalone

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from make_media import make_photo, make_text_pdf  # noqa: E402

BENCH = "words eval"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
HAN = "发票收据合同报告会议旅行照片家庭朋友生日学校医院银行公司城市天气音乐电影书店咖啡"
LATIN = ["Einkauf bei {name}: Äpfel, Brötchen und Käse, Bon {number}",  # German
         "Reçu de {name} pour le café à Besançon, ticket {number}"]  # French
NAMES = ["Müller", "Schäfer", "Lefèvre", "Dubois", "Große", "Côté", "Weiß", "Chloé"]
CUSTOMERS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"]  # a PDF's standard font writes ASCII here


def write_library(root: Path, per_kind: int) -> list[tuple[str, str, Path]]:
    """The files, and for each the query that should find it: (query id, query text, file)."""
    labelled = []
    han = "".join(dict.fromkeys(HAN))  # each character once (行 is in 旅行 and 银行)
    han_words = (a + b for a in han for b in han if a != b)  # each Chinese note gets a pair of its own
    for i in range(per_kind):
        number = 4700 + i  # neighbours: invoice 4711 must not find 4710 or 4712 first
        path = make_text_pdf(root / "invoices" / f"scan-{i:03d}.pdf",
                             [[f"Invoice {number}", f"Customer {CUSTOMERS[i % len(CUSTOMERS)]}",
                               f"Total {i * 7 % 500} EUR"]])
        labelled.append((f"invoice-{number}", f"invoice {number}", path))
    for i in range(per_kind):
        name = f"IMG_{2000 + i}.JPG" if i % 2 else f"DSC-{i:04d}.jpg"
        path = root / "photos" / name
        make_photo(path, size=(64 + i % 7, 48))
        labelled.append((f"photo-{i}", Path(name).stem, path))
    for i in range(per_kind):
        path = root / "notes" / f"note-{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 3 == 2:  # Chinese: a two-character word of its own, in a sentence of common ones
            word = next(han_words)
            path.write_text(f"今天的{word}在桌子上。第{i}号\n")
            labelled.append((f"note-{i}", word, path))
        else:
            template = LATIN[i % 2]
            name = NAMES[i % len(NAMES)]
            path.write_text(template.format(name=name, number=9000 + i) + "\n")
            labelled.append((f"note-{i}", f"{name.lower()} {9000 + i}", path))
    return labelled


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV)
    if done.returncode:
        raise SystemExit(f"qvlsearch {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def run(workdir: Path, checkpoints: dict[str, Path], per_kind: int = 100) -> list[Figure]:
    library, index = workdir / "library", workdir / "index"
    labelled = write_library(library, per_kind)
    unique = {text for _, text, _ in labelled}
    cli("index", str(library), "--index", str(index), "--model", str(checkpoints["embedder"]))
    queries, qrels = workdir / "queries.jsonl", workdir / "qrels.tsv"
    queries.write_text("".join(json.dumps({"id": qid, "text": text}) + "\n" for qid, text, _ in labelled))
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{qid}\t{path}\t1\n" for qid, _, path in labelled))
    found = json.loads(cli("eval", str(queries), "--qrels", str(qrels), "--index", str(index), "--json"))
    figures = []
    for setting in found["settings"]:
        detail = {"queries": found["evaluated"], "files": len(labelled), "distinct_query_texts": len(unique),
                  "latency_ms": setting["latency_ms"]}
        for metric in ("recall@1", "recall@10", "mrr@10"):
            figures.append(Figure(BENCH, f"{setting['mode']} {metric}", setting[metric], "", detail=detail))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=100, help="files of each kind (invoices, photos, notes)")
    args = parser.parse_args()
    run_standalone(lambda work, checkpoints: run(work, checkpoints, args.per_kind), "words-eval", budget_s=600)
