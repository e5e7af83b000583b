"""`compile=`: the model's layers under torch.compile give the same vectors and scores, and a
compiler that fails leaves a warning and the eager model, never a failed run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PHOTOS

from qvlsearch import Embedder, Reranker

ITEMS = [{"text": "a cat on a chair"}, {"text": "boats on a lake " * 20}, {"image": str(PHOTOS / "cat.jpg")},
         {"text": "a bee", "image": str(PHOTOS / "bee.jpg")}]


@pytest.fixture
def broken_compiler():
    """A machine without a working C++ compiler (Inductor's CPU code needs one), and no cached
    compiled code: compiling really fails."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    torch._dynamo.reset()
    cpp_compiler_search.cache_clear()
    with inductor_config.patch({"cpp.cxx": ("false",), "fx_graph_cache": False, "autotune_local_cache": False}):
        yield
    cpp_compiler_search.cache_clear()
    torch._dynamo.reset()


def test_compiled_embedder_gives_the_eager_vectors(checkpoints, embedder):
    torch._dynamo.reset()
    compiled = Embedder(str(checkpoints["embedder"]), device="cpu", compile="default")
    np.testing.assert_allclose(compiled.embed(ITEMS), embedder.embed(ITEMS), atol=1e-5)
    assert compiled.compiled_layers and compiled.first_compiled_batch_s > 0  # it did compile
    other_shapes = [{"text": "one two"}, {"image": str(PHOTOS / "cake.jpg")}]
    np.testing.assert_allclose(compiled.embed(other_shapes), embedder.embed(other_shapes), atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(checkpoints, embedder, broken_compiler, caplog):
    compiled = Embedder(str(checkpoints["embedder"]), device="cpu", compile="default")
    with caplog.at_level(logging.WARNING, logger="qvlsearch"):
        vectors = compiled.embed(ITEMS)
    np.testing.assert_allclose(vectors, embedder.embed(ITEMS), atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert compiled.compiled_layers == [] and compiled.compile_mode is None


def test_a_failing_compiler_leaves_reranker_scores_as_they_were(checkpoints, broken_compiler):
    path = str(checkpoints["reranker"])
    documents = [{"text": "a cat"}, {"image": str(PHOTOS / "cat.jpg")}, {"text": "boats"}]
    expected = Reranker(path, device="cpu").rerank("a cat", documents)
    np.testing.assert_allclose(Reranker(path, device="cpu", compile="default").rerank("a cat", documents),
                               expected, atol=1e-6)


def test_unknown_compile_mode_is_refused(checkpoints):
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        Embedder(str(checkpoints["embedder"]), device="cpu", compile="fast")


def test_index_compile_with_a_failing_compiler_indexes_everything_and_says_so_once(checkpoints, tmp_path):
    """`qvlsearch index --compile` on a machine whose C++ compiler fails (CXX=false; no cached code)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CXX": "false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat.jpg", "bee.jpg"):
        shutil.copy(PHOTOS / name, folder / name)
    (folder / "note.txt").write_text("a cat on a chair")
    run = subprocess.run([sys.executable, "-m", "qvlsearch", "index", str(folder), "--index", str(tmp_path / "index"),
                          "--model", str(checkpoints["embedder"]), "--device", "cpu", "--compile", "default",
                          "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["added"] == 3
    assert [line for line in run.stderr.splitlines() if "torch.compile failed" in line] == [run.stderr.strip()]


def test_index_refuses_an_unknown_compile_mode(tmp_path):
    run = subprocess.run([sys.executable, "-m", "qvlsearch", "index", str(tmp_path), "--compile", "fast"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "must be one of default, reduce-overhead, max-autotune" in run.stderr
