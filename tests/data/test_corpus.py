"""The one offline corpus builder (module docstrings) that the demo, ``btlm quality`` and the data-preparation
benchmark share."""

from btlm.data.corpus import module_docstrings

LONG = "Return the sum of the numbers given, skipping the ones that are not finite, in the order given."


def test_module_docstrings_one_document_per_module(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text(f'"""{LONG}"""\n\ndef f():\n    """short"""\n')
    (tmp_path / "pkg" / "tests" / "test_x.py").write_text(f'"""{LONG}"""\n')  # a test suite: left out
    (tmp_path / "b.py").write_text(f'class C:\n    """{LONG}"""\n\n    async def g(self):\n        """{LONG}!"""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "plain.py").write_text("x = 1\n")
    docs = list(module_docstrings(tmp_path))
    assert docs == [("b", f"{LONG}\n\n{LONG}!"), ("broken", ""), ("pkg___init__", LONG), ("plain", "")]
    assert list(module_docstrings(tmp_path, min_chars=0))[2] == ("pkg___init__", f"{LONG}\n\nshort")
    assert list(module_docstrings(tmp_path, names={"b", "plain"})) == [docs[0], docs[3]]  # the others unread


def test_the_stdlib_gives_megabytes_of_english():
    docs = dict(module_docstrings())
    assert sum(map(len, docs.values())) > 1_000_000 and "argparse" in docs and docs["argparse"]
    assert not any(name.startswith("test_") or "_test_" in name for name in docs)
